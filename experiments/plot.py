"""Test accuracy vs rank, one panel per task, from the experiments' test records (the chosen rates only).

    python experiments/plot.py --runs fashion=runs/vision,digits=runs/vision,wordnet=runs/language \
        --out docs/results-ranks.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import RANK_FREE, read

from liera.apps.methods import label

COLOURS = {"lora": ("tab:blue", "o"), "liera-taylor": ("tab:red", "s"), "liera-exact": ("tab:orange", "^"),
           "full": ("black", None), "linear-probe": ("grey", None)}
STYLE = {m: (label(m), colour, marker) for m, (colour, marker) in COLOURS.items()}  # labels from the method table


def series(records: Path, chosen: dict) -> dict:
    """method -> sorted [(r, mean, sd, n)] at the method's chosen rate."""
    out: dict = {}
    for (method, r, lr), rows in read(records).items():
        if chosen.get(method) != lr:
            continue
        accs = [row["test_accuracy"] for row in rows]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        out.setdefault(method, []).append((r, statistics.mean(accs), sd, len(accs)))
    return {m: sorted(v) for m, v in out.items()}


def floor(data: dict) -> float:
    """The lowest mean worth the axis: the linear probe when there is one (an arm below it collapsed)."""
    probe = data.get("linear-probe")
    if probe:
        return probe[0][1] - probe[0][2]
    return min(m for pts in data.values() for _, m, _, _ in pts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="task=folder,... (the folder holds <task>-test.jsonl and "
                                                 "<task>-chosen.json)")
    p.add_argument("--out", default="runs/results-ranks.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [item.split("=", 1) for item in args.runs.split(",")]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for ax, (task, folder) in zip(axes[0], tasks):
        folder = Path(folder)
        chosen = json.loads((folder / f"{task}-chosen.json").read_text())
        data = series(folder / f"{task}-test.jsonl", chosen)
        ranks = sorted({r for m, pts in data.items() if m not in RANK_FREE for r, *_ in pts})
        for method, (label, color, marker) in STYLE.items():
            pts = data.get(method)
            if not pts:
                continue
            if method in RANK_FREE:
                _, mean, sd, n = pts[0]
                ax.axhline(mean, color=color, ls="--" if method == "full" else ":", lw=1.2,
                           label=f"{label} ({mean:.3f})")
                ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.08)
                continue
            rs, means, sds = [q[0] for q in pts], [q[1] for q in pts], [q[2] for q in pts]
            ax.errorbar(rs, means, yerr=sds, color=color, marker=marker, capsize=3, lw=1.4, label=label)
        # the axis spans the linear probe .. the best arm; an arm that collapsed below it is written, not drawn
        bottom = min(m for pts in data.values() for _, m, _, _ in pts if m >= floor(data)) - 0.01
        top = min(1.0, max(m + sd for pts in data.values() for _, m, sd, _ in pts if m >= bottom)) + 0.005
        ax.set_ylim(bottom, top)
        off_axis = [f"{STYLE[m][0]}, r = {r}: {mean:.3f} ± {sd:.3f} (off the axis)"
                    for m, pts in data.items() for r, mean, sd, _ in pts if mean < bottom]
        if off_axis:
            ax.text(0.02, 0.98, "\n".join(off_axis), transform=ax.transAxes, va="top", fontsize=7, color="tab:red")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks or [8])
        ax.set_xticklabels([str(r) for r in ranks or [8]])
        ax.set_xlabel("rank r (same trainable parameters for LoRA and LieRA)")
        ax.set_ylabel("test accuracy (mean ± sd over seeds)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
