"""VTAB-1k with ConvNeXt-V2 and LieRA on the convolutions (image-classification table of the LieRA paper).

Targets: the VTAB-1k results table of "Generalized Tensor-based Parameter-Efficient Fine-Tuning via Lie Group
Transformations" (LieRA; Si et al., ICCV 2025, arXiv 2504.00851): ConvNeXt-V2 fine-tuned on each VTAB-1k task
from 1,000 training images, top-1 accuracy on the task's test split. (The paper text was not available when
this script was written, so the table number and the hyper-parameters below are not checked against it.)

What is adapted (``--targets``, default ``conv+pointwise``):
  * every nn.Conv2d: the 4x4 stem, the 2x2 downsampling convs and the 7x7 depthwise convs (4-D kernels, the
    case LieRA is built for), and
  * the pointwise (1x1) convolutions, which ConvNeXt implements as nn.Linear (``pwconv1``/``pwconv2``).
    They are convolutions of the architecture, so "all convolutions" includes them here.
  ``--targets all-conv`` adapts only the nn.Conv2d modules (stem, downsampling, depthwise).
  The classifier head is new for each task and trains in full (``modules_to_save=["classifier"]``).

Hyper-parameters (the common VTAB-1k protocol; assumptions, verify against the paper):
  AdamW, batch 64, lr 1e-3, weight decay 1e-4, 100 epochs, linear warm-up for 10 epochs then cosine decay,
  224x224 inputs, ImageNet normalisation, no augmentation, r=8, alpha=16 (scale alpha/r=2), Taylor map
  (W + W*D, the paper's LieRA). LieRA moves each weight by about |W|*D, so its best learning rate sits a few
  times above LoRA's; sweep --lr if a task underfits.

Protocol: ``--protocol 1000`` trains on 1,000 training images (the whole VTAB-1k train800val200 set; a random
1,000 if the data has more) and reports test accuracy; ``--protocol 800-200`` trains on 800 and reports
accuracy on the other 200 (for choosing hyper-parameters).

Data (``--data``): an image folder root/<class>/<img> or root/{train,test}/<class>/<img>, or an .npz with
train_x (N,H,W[,C]) uint8, train_y and optionally test_x, test_y (without a test split 20% of train is held out).

    python examples/vtab1k_convnextv2.py --model /models/convnextv2-base-22k-224 --data /data/vtab/dtd --out runs/dtd
    python examples/vtab1k_convnextv2.py --smoke --out /tmp/vtab-smoke      # tiny random model, seconds

Writes ``<out>/metrics.json`` and the adapter (``<out>/adapter``: adapter_config.json + adapter_model.safetensors).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

import liera
from liera.apps.data import ImageTask, load_image_folder, load_npz_images, to_model_input
from liera.apps.progress import progress

# protocol defaults (see the header: common VTAB-1k settings, not checked against the paper)
EPOCHS = 100
WARMUP_EPOCHS = 10
BATCH_SIZE = 64
LR = 1e-3
WEIGHT_DECAY = 1e-4
RANK = 8
ALPHA = 16.0
RESOLUTION = 224
TRAIN_SIZE = 1000


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local ConvNextV2ForImageClassification folder (from_pretrained)")
    p.add_argument("--data", help="image folder or .npz (see header)")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--r", type=int, default=RANK)
    p.add_argument("--alpha", type=float, default=ALPHA)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--exp-map", choices=list(liera.group.EXP_MAPS), default=liera.group.TAYLOR)
    p.add_argument("--targets", choices=["conv+pointwise", "all-conv"], default="conv+pointwise")
    p.add_argument("--resolution", type=int, default=RESOLUTION)
    p.add_argument("--protocol", choices=["1000", "800-200"], default="1000")
    p.add_argument("--train-size", type=int, default=TRAIN_SIZE)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny random ConvNeXt-V2 and synthetic images; seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.resolution, args.batch_size, args.eval_batch_size = "cpu", 32, 8, 16
        args.max_steps, args.warmup_epochs, args.train_size, args.log_every = 2, 0, 24, 1
        args.r, args.alpha = 2, 4.0
    elif not (args.model and args.data):
        p.error("--model and --data are required (or --smoke)")
    return args


# ---------------------------------------------------------------------------------------------- data and model
def load_task(path: str, resolution: int) -> ImageTask:
    return load_image_folder(path, resolution) if Path(path).is_dir() else load_npz_images(path)


def protocol_split(task: ImageTask, protocol: str, train_size: int, seed: int) -> ImageTask:
    """1,000 training images (random subset if there are more); 800-200 holds the last 200 out as the test set."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(task.train_y))
    if len(idx) > train_size:
        print(f"[data] {len(idx)} training images; using a random {train_size} (VTAB-1k protocol)")
        idx = idx[:train_size]
    x, y = task.train_x[idx], task.train_y[idx]
    if protocol == "800-200":
        n_val = max(1, round(len(y) * 0.2))
        return ImageTask(f"{task.name}-800-200", x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:], task.classes)
    return ImageTask(task.name, x, y, task.test_x, task.test_y, task.classes)


def smoke_data(out: Path) -> Path:
    """A small synthetic .npz (3 classes told apart by colour) read back through liera.apps.data.load_npz_images."""
    rng = np.random.default_rng(0)

    def images(n):
        y = np.arange(n) % 3
        x = rng.integers(0, 80, size=(n, 16, 16, 3))
        x[np.arange(n), :, :, y] += 150
        return x.astype(np.uint8), y

    (trx, try_), (tex, tey) = images(24), images(12)
    path = out / "smoke_data.npz"
    np.savez(path, train_x=trx, train_y=try_, test_x=tex, test_y=tey)
    return path


def build_model(args, classes: list[str]):
    import transformers

    labels = dict(num_labels=len(classes), id2label=dict(enumerate(classes)),
                  label2id={c: i for i, c in enumerate(classes)})
    if args.smoke:
        cfg = transformers.ConvNextV2Config(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                            image_size=args.resolution, **labels)
        torch.manual_seed(args.seed)
        return transformers.ConvNextV2ForImageClassification(cfg)
    return transformers.ConvNextV2ForImageClassification.from_pretrained(
        args.model, ignore_mismatched_sizes=True, **labels)  # a new, randomly initialised head for the task


def liera_config(args) -> liera.LieRAConfig:
    # "all" on ConvNeXt-V2 = every Conv2d + the pointwise nn.Linear layers; the classifier is excluded because it is
    # in modules_to_save (trained in full)
    targets = "all" if args.targets == "conv+pointwise" else "all-conv"
    return liera.LieRAConfig(r=args.r, alpha=args.alpha, target_modules=targets, modules_to_save=["classifier"],
                             exp_map=args.exp_map, dropout=args.dropout)


# ---------------------------------------------------------------------------------------------- train and test
def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


@torch.no_grad()
def evaluate(model, x_uint8, y, args) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(y), args.eval_batch_size):
        xb = to_model_input(x_uint8[start:start + args.eval_batch_size], args.resolution).to(args.device)
        logits = model(pixel_values=xb).logits
        correct += int((logits.argmax(-1).cpu() == torch.as_tensor(y[start:start + args.eval_batch_size])).sum())
    return correct / max(1, len(y))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    task = load_task(str(smoke_data(out)) if args.smoke else args.data, args.resolution)
    task = protocol_split(task, args.protocol, args.train_size, args.seed)
    if len(task.test_y) == 0:
        raise SystemExit("no test images: give test_x/test_y or a test/ folder, or use --protocol 800-200")
    print(f"[data] {task.name}: {len(task.train_y)} train, {len(task.test_y)} test, {task.num_classes} classes")

    model = liera.get_liera_model(build_model(args, task.classes), liera_config(args)).to(args.device)
    kinds = {}
    for key, owner, _ in model.adapted_weights():
        kinds[type(owner).__name__] = kinds.get(type(owner).__name__, 0) + 1
    print(f"[liera] adapted weights: {kinds}")
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(task.train_y) / args.batch_size)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup = min(int(args.warmup_epochs * steps_per_epoch), total_steps // 2)  # a short --max-steps run still decays
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps))
    gen = torch.Generator().manual_seed(args.seed)
    losses, step, start = [], 0, time.perf_counter()
    bar = progress(range(total_steps), desc="train", enabled=not args.no_progress)
    it = iter(bar)
    while step < total_steps:
        model.train()
        for idx in torch.randperm(len(task.train_y), generator=gen).split(args.batch_size):
            xb = to_model_input(task.train_x[idx.numpy()], args.resolution).to(args.device)
            yb = torch.as_tensor(task.train_y[idx.numpy()]).long().to(args.device)
            loss = F.cross_entropy(model(pixel_values=xb).logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            next(it, None)
            if step % args.log_every == 0 or step == total_steps:
                print(f"[train] step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} "
                      f"loss {np.mean(losses[-args.log_every:]):.4f} lr {sched.get_last_lr()[0]:.2e}", flush=True)
            if step >= total_steps:
                break
    if hasattr(bar, "close"):
        bar.close()
    train_time = time.perf_counter() - start

    acc = evaluate(model, task.test_x, task.test_y, args)
    print(f"[test] accuracy {acc:.4f} on {len(task.test_y)} images")
    model.save_pretrained(out / "adapter")
    metrics = {
        "recipe": "vtab1k_convnextv2", "task": task.name, "protocol": args.protocol,
        "test_accuracy": acc, "n_train": int(len(task.train_y)), "n_test": int(len(task.test_y)),
        "final_train_loss": float(np.mean(losses[-min(10, len(losses)):])), "steps": step,
        "train_time_s": train_time, "trainable_params": trainable, "total_params": total, "adapted_weights": kinds,
        "hparams": {k: v for k, v in vars(args).items() if k not in ("device",)},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[done] metrics -> {out / 'metrics.json'}, adapter -> {out / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
