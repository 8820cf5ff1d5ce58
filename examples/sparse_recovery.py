"""Prune a network, recover it with LieRA, merge, and keep every zero: the sparse-recovery path end to end.

A pruned model (unstructured, or N:M such as 2:4, the pattern sparse tensor cores run) that is fine-tuned with LieRA
stays pruned after merging: W * g(D) is exactly 0 wherever W is 0, at any rank. A merged LoRA fills every zero;
masked LoRA (W + BA * (W != 0), SQFT) keeps them by masking its update. liera offers both behind one switch,
``LieRAConfig(keep_zeros=True)``, and guarantees the zeros bit for bit through merge, unmerge and merge_and_unload.

Steps (all on CPU in seconds; scikit-learn's 8x8 digits, an MLP built here and trained dense first):
  1. train the dense MLP (the "pretrained" model) and score it;
  2. prune its two hidden layers with Wanda at 2:4 (liera.apps.prune; calibration: 128 training images);
  3. recover with LieRA-Taylor + rms scaling and with masked LoRA (both keep_zeros=True), and with plain LoRA for
     contrast (r = 4, the same rate);
  4. merge_and_unload, then print accuracy, sparsity and 2:4 validity of the merged weights, and check that every
     zero of the pruned weights is still there, bit for bit.

    python examples/sparse_recovery.py --out runs/sparse          # ~20 s on one CPU thread
    python examples/sparse_recovery.py --prune magnitude:0.7      # another pruning spec (as liera finetune --prune)
    python examples/sparse_recovery.py --smoke --out /tmp/sparse  # a few steps, for the tests
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import liera
from liera.apps.prune import parse_prune, prune_model
from liera.sparsity import same_zeros, sparsity_report
from liera.targeting import model_sparsity

PRUNED = ["fc1", "fc2"]


def digits(seed: int = 0):
    """(train, test) tensors of scikit-learn's 1,797 digits, 1,000 / 797, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:1000], y[:1000]), (x[1000:], y[1000:])


class MLP(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def train(model: nn.Module, data, epochs: int, lr: float, seed: int = 0) -> None:
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/sparse-recovery")
    p.add_argument("--prune", default="wanda:2:4", help="wanda:0.5, magnitude:0.5, 2:4, magnitude:2:4, ...")
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5, help="recovery epochs")
    p.add_argument("--smoke", action="store_true", help="one epoch everywhere (the tests)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    train_data, test_data = digits()
    dense_epochs, epochs = (1, 1) if args.smoke else (20, args.epochs)

    dense = MLP()
    train(dense, train_data, dense_epochs, 1e-3)
    metrics = {"dense_accuracy": accuracy(dense, test_data)}

    pruned = copy.deepcopy(dense)
    spec = parse_prune(args.prune)
    calibration = [train_data[0][:128]]
    result = prune_model(pruned, spec, target_modules=PRUNED,
                         calibration=calibration if spec.method == "wanda" else None)
    zeros = {n: pruned.get_submodule(n).weight.detach().clone() for n in PRUNED}
    metrics.update(pruned_accuracy=accuracy(pruned, test_data), pruned_sparsity=result.fraction, prune=str(spec))
    print(f"dense {metrics['dense_accuracy']:.4f}; pruned with {spec} ({100 * result.fraction:.1f}% of fc1, fc2 "
          f"zero) {metrics['pruned_accuracy']:.4f}")

    arms = {"liera-rms": dict(exp_map="taylor", layer_scaling="rms", keep_zeros=True),
            "masked-lora": dict(update="additive", keep_zeros=True),
            "lora": dict(update="additive")}  # plain LoRA, for contrast: its merge fills the zeros
    for name, options in arms.items():
        model = copy.deepcopy(pruned)
        config = liera.LieRAConfig(r=args.r, alpha=float(args.r), target_modules=PRUNED, modules_to_save=["head"],
                                   **options)
        wrapped = liera.get_liera_model(model, config)
        train(wrapped, train_data, epochs, 3e-3, seed=1)  # the image rate of liera's method table for all three
        recovered = accuracy(wrapped, test_data)
        if name == "liera-rms":
            wrapped.save_pretrained(Path(args.out) / "adapter")
        merged = wrapped.merge_and_unload()  # a plain MLP again
        kept = all(same_zeros(zeros[n], merged.get_submodule(n).weight) for n in PRUNED)
        rows = model_sparsity(merged, PRUNED)  # the merged weights, as a deployment gets them
        metrics[name] = {"recovered_accuracy": recovered, "merged_accuracy": accuracy(merged, test_data),
                         "every_zero_kept": kept,
                         "merged_sparsity": sum(r.zeros for r in rows) / sum(r.numel for r in rows),
                         "layers_2_4_valid": sum(1 for r in rows if r.nm.get("2:4"))}
        print(f"\n{name}: recovered {recovered:.4f}, merged {metrics[name]['merged_accuracy']:.4f}; every zero kept "
              f"bit for bit: {kept}")
        print(sparsity_report(rows, f"{name}, merged"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return 0 if all(metrics[n]["every_zero_kept"] for n in arms if arms[n].get("keep_zeros")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
