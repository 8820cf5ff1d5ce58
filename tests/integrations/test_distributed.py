"""liera under torch.distributed: DDP and FSDP2 (fully_shard), 2 CPU processes with gloo.

Equivalence is checked in float64 against single-process training on the same global batch (each rank
holds half of it; DDP and FSDP average gradients, which equals the full-batch mean loss)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import liera
import dist_workers as W

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
              pytest.mark.smoke]  # long: CI runs it in its own step (python -m pytest -q -m smoke)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(kind, exp_map, extra_adapter=False):
    _, lm = W.make(kind, exp_map, extra_adapter)
    x, y = W.data(kind)
    W.train(lm, [p for p in lm.parameters() if p.requires_grad], x, y)
    return lm


@pytest.mark.parametrize("exp_map", ["taylor", "exact"])
def test_ddp_matches_single_process_and_reduces_only_active_adapter(tmp_path, exp_map):
    mp.spawn(W.ddp_worker, args=(2, free_port(), str(tmp_path), "convnet", exp_map), nprocs=2)
    got = torch.load(tmp_path / "ddp.pt")
    assert got["reduced"] and all(".default." in n for n in got["reduced"]), "only the active adapter is reduced"
    expected = single_process("convnet", exp_map, extra_adapter=True).get_adapter_state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, exp_map, per_module", [("mlp", "taylor", False), ("mlp", "exact", True),
                                                       ("convnet", "taylor", True), ("convnet", "exact", False)])
def test_fsdp2_matches_single_process_saves_once_and_reloads(tmp_path, kind, exp_map, per_module):
    mp.spawn(W.fsdp_worker, args=(2, free_port(), str(tmp_path), kind, exp_map, per_module), nprocs=2)
    sharded = torch.load(tmp_path / "fsdp.pt")["sharded"]
    assert any(".liera_" in n for n in sharded) and any(".liera_" not in n for n in sharded), \
        "base weights and adapter tensors are both sharded"
    reference = single_process(kind, exp_map)
    torch.manual_seed(0)  # the same base weights as W.make
    base = (W.MLP() if kind == "mlp" else W.ConvNet()).double()
    loaded = liera.LieRAModel.from_pretrained(base, tmp_path / "adapter")
    for k, v in reference.get_adapter_state_dict().items():
        torch.testing.assert_close(loaded.get_adapter_state_dict()[k], v, rtol=1e-10, atol=1e-12)
    x, _ = W.data(kind)
    reference.eval()
    torch.testing.assert_close(loaded(x), reference(x), rtol=1e-10, atol=1e-12)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(x), reference(x), rtol=1e-9, atol=1e-10)


def test_sharding_before_wrapping_is_refused_with_the_fix(tmp_path):
    mp.spawn(W.shard_first_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    message = (tmp_path / "error.txt").read_text()
    assert "already sharded" in message and "Wrap first, then shard" in message


def test_hf_trainer_under_torchrun(tmp_path):
    pytest.importorskip("transformers")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "trainer_ddp_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import json

    info = json.loads((tmp_path / "world.json").read_text())
    assert info["world_size"] == 2 and info["wrapped"] == "DistributedDataParallel"
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
