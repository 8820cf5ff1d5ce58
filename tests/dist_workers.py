"""Worker functions for tests/integrations/test_distributed.py (2 processes, gloo, CPU). Results go to files."""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import liera

STEPS = 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.dw(torch.tanh(self.conv(x))).mean((2, 3)))


def make(kind, exp_map, extra_adapter=False):
    torch.manual_seed(0)
    model = (MLP() if kind == "mlp" else ConvNet()).double()
    targets = ["fc1", "fc2"] if kind == "mlp" else ["conv", "dw", "head"]
    lm = liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=targets, exp_map=exp_map))
    if extra_adapter:  # present but inactive: must not trip DDP's unused-parameter check
        lm.add_adapter("unused", liera.LieRAConfig(r=2, target_modules=targets))
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    return model, lm


def data(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, dtype=torch.float64, generator=g) if kind == "mlp" else \
        torch.randn(8, 3, 6, 6, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 3, (8,), generator=g)


def train(module, params, x, y):
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        opt.step()


def setup(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def teardown():
    """Both ranks reach here before the group goes, then the process ends without running C++ static destructors.

    A rank that destroys the group while its peer still talks to gloo can abort; and even after a barrier, gloo's
    background threads can be torn down at interpreter exit while joinable, which aborts the process ("terminate
    called without an active exception", SIGABRT: seen in CI on fsdp convnet-taylor after every result was written).
    Results are on disk by now, so the worker leaves with os._exit(0): the test checks the files, not the exit."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def ddp_worker(rank, world, port, out_dir, kind, exp_map):
    setup(rank, world, port)
    from torch.nn.parallel import DistributedDataParallel as DDP

    _, lm = make(kind, exp_map, extra_adapter=True)
    x, y = data(kind)
    shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    ddp = DDP(lm)
    reduced = {n for n, p in ddp.module.named_parameters() if p.requires_grad}
    train(ddp, [p for p in ddp.parameters() if p.requires_grad], x[shard], y[shard])
    if rank == 0:
        torch.save({"state": lm.get_adapter_state_dict(), "reduced": sorted(reduced)}, os.path.join(out_dir, "ddp.pt"))
    teardown()


def fsdp_worker(rank, world, port, out_dir, kind, exp_map, per_module):
    setup(rank, world, port)
    from torch.distributed.fsdp import fully_shard

    model, lm = make(kind, exp_map)
    if per_module:
        for child in model.children():
            fully_shard(child)
    fully_shard(model)
    sharded = [n for n, p in lm.named_parameters() if type(p).__name__ == "DTensor"]
    x, y = data(kind)
    shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    train(lm, [p for p in lm.parameters() if p.requires_grad], x[shard], y[shard])
    lm.save_pretrained(os.path.join(out_dir, "adapter"), is_main_process=rank == 0)
    if rank == 0:
        torch.save({"sharded": sharded}, os.path.join(out_dir, "fsdp.pt"))
    teardown()


def shard_first_worker(rank, world, port, out_dir):
    setup(rank, world, port)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = MLP()
    fully_shard(model)
    try:
        liera.get_liera_model(model, liera.LieRAConfig(target_modules=["fc1"]))
        message = "no error"
    except ValueError as exc:
        message = str(exc)
    if rank == 0:
        with open(os.path.join(out_dir, "error.txt"), "w") as fh:
            fh.write(message)
    teardown()
