"""`liera finetune --prune`: the base is pruned first, the adapter keeps its zeros (keep_zeros), results.json records
the sparsity pruned and the sparsity the merged model keeps; specs and methods that cannot keep zeros are refused."""
import copy
import json
import re

import numpy as np
import pytest
import torch

from liera.apps import cli, finetune, lm
from liera.sparsity import same_zeros

TINY = "finetune_models:tiny_cnn"


def make_npz(path, n=24):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    x = rng.integers(0, 255, (n, 10, 10, 3), dtype=np.uint8)
    x[y == 1] //= 4
    np.savez(path, train_x=x[:16], train_y=y[:16], test_x=x[16:], test_y=y[16:])
    return path


@pytest.mark.parametrize("method", ["liera-rms", "lora"])
def test_magnitude_pruned_cnn_keeps_its_zeros_after_training(tmp_path, method):
    data = make_npz(tmp_path / "toy.npz")
    run = finetune.run_finetune(data=str(data), model=TINY, out=tmp_path / "out", method=method, r=2, epochs=2,
                                batch_size=8, resolution=12, progress=False, threads=1, prune="magnitude:0.5")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["pruned"]["spec"] == "magnitude:0.5" and res["pruned"]["layers"] == 2
    assert abs(res["pruned"]["sparsity"] - 0.5) < 0.01
    assert res["deployed"]["sparsity"] == res["pruned"]["sparsity"], "the merged model keeps every zero"
    base = run.model.base_model
    pruned = {k: base.get_parameter(k).detach().clone() for k in ("conv1.weight", "conv2.weight")}
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["keep_zeros"] is True, "a reload keeps the zeros too"
    merged = run.model.merge_and_unload()
    for k, w in pruned.items():
        assert same_zeros(w, merged.get_parameter(k)) and not torch.equal(w, merged.get_parameter(k))


def test_wanda_2_4_on_a_tiny_llama_task(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from liera.apps.lmtasks import wordnet_isa

    task = wordnet_isa()
    for split in task.splits:
        task.splits[split] = task.splits[split][:24]
    model, tokenizer = lm.tiny_llama(task)
    monkeypatch.setattr(lm, "load_causal_lm", lambda name, **kw: (copy.deepcopy(model), tokenizer))
    monkeypatch.setattr(finetune.causal, "get_lm_task", lambda name: task)
    finetune.run_finetune(data="wordnet-isa", out=tmp_path, method="liera-taylor", r=2, epochs=1, batch_size=8,
                          progress=False, prune="2:4")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["pruned"]["spec"] == "wanda:2:4" and res["pruned"]["layers"] == 10  # 5 projections x 2 layers
    assert res["pruned"]["sparsity"] == 0.5 and res["deployed"]["sparsity"] == 0.5
    assert res["deployed"]["layers_2_4_valid"] == 10


@pytest.mark.parametrize("argv,message", [
    (["--prune", "wanda:0.5"], "Prune convolutions and other weights with magnitude"),
    (["--prune", "magnitude:1.5"], r"must be in \(0, 1\)"),
    (["--prune", "sparsegpt:0.5"], "unknown method 'sparsegpt'"),
    (["--prune", "magnitude:0.5", "--method", "full"], "keeps the zeros only with liera's adapters"),
])
def test_bad_prune_requests_name_the_fix(tmp_path, capsys, argv, message):
    data = make_npz(tmp_path / "toy.npz")
    code = cli.main(["finetune", "--data", str(data), "--model", TINY, "--out", str(tmp_path / "o"), "--epochs", "1",
                     "--resolution", "12", "--no-progress", "--threads", "1", *argv])
    assert code != 0
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o" / "adapter").exists()
