"""PEFT's own load path for LieRA adapters (PeftModel.from_pretrained / load_adapter after `import
liera.integrations.peft`): a damaged or misfitting folder is refused before any layer is injected, with the fix
named, and the base model is left as it was; config errors use the PEFT-side field names."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from liera.integrations import peft as liera_peft  # noqa: E402
from liera.integrations.peft import LieraPeftConfig, LieraLayer  # noqa: E402


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(6, width)
        self.b = nn.Linear(width, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def saved_folder(tmp_path: Path, width: int = 8, r: int = 2, name: str = "ad") -> Path:
    torch.manual_seed(0)
    model = peft.get_peft_model(Net(width), LieraPeftConfig(r=r, target_modules=["a", "b"], init_weights=False,
                                                        modules_to_save=["head"]))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: tuple[str, dict[str, torch.Tensor]], x: torch.Tensor,
                     y: torch.Tensor) -> None:
    assert not any(isinstance(m, LieraLayer) for m in model.modules()), "a layer was injected"
    text, state = before
    assert repr(model) == text and state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(model(x), y)


@pytest.fixture
def base():
    torch.manual_seed(1)
    model = Net()
    x = torch.randn(5, 6)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def test_a_good_folder_still_loads_with_its_outputs(tmp_path, base):
    folder = saved_folder(tmp_path)
    torch.manual_seed(0)
    fresh = Net()  # the base weights saved_folder trained on (same seed)
    torch.manual_seed(0)
    trained = peft.get_peft_model(Net(), LieraPeftConfig(r=2, target_modules=["a", "b"], init_weights=False,
                                                     modules_to_save=["head"]))
    _, x, _ = base
    loaded = peft.PeftModel.from_pretrained(fresh, folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)


@pytest.mark.parametrize("keep", [0.5, 0.95, 6])
def test_a_truncated_weights_file_is_refused_before_injection(tmp_path, base, keep):
    folder = saved_folder(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    model, x, y = base
    before = snapshot(model)
    with pytest.raises(ValueError, match="truncated or corrupted") as err:
        peft.PeftModel.from_pretrained(model, folder)
    assert "Save the adapter again" in str(err.value) and "model is unchanged" in str(err.value)
    assert_untouched(model, before, x, y)


def test_a_missing_weights_file_is_refused_before_injection(tmp_path, base):
    folder = saved_folder(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    model, x, y = base
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match=r"lacks \['adapter_model.safetensors'\].*Nothing was injected"):
        peft.PeftModel.from_pretrained(model, folder)
    assert_untouched(model, before, x, y)


def test_an_adapter_of_another_model_is_refused_before_injection(tmp_path, base):
    folder = saved_folder(tmp_path, width=16)  # a.weight (16, 6) there, (8, 6) here
    model, x, y = base
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"a\.weight has shape \(16, 6\); this model's has \(8, 6\)") as err:
        peft.PeftModel.from_pretrained(model, folder)
    assert "base model it was trained on" in str(err.value)
    assert_untouched(model, before, x, y)


def test_adapter_tensors_of_other_shapes_are_refused_before_injection(tmp_path, base):
    folder = saved_folder(tmp_path, r=4)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 2  # the config edited after saving: the file holds rank-4 tensors
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model, x, y = base
    before = snapshot(model)
    with pytest.raises(ValueError, match="with other shapes") as err:
        peft.PeftModel.from_pretrained(model, folder)
    assert "r=2" in str(err.value) and "model is unchanged" in str(err.value)
    assert_untouched(model, before, x, y)


def test_a_head_of_another_size_is_refused_before_injection(tmp_path, base):
    folder = saved_folder(tmp_path)
    model, x, y = base
    model.head = nn.Linear(4, 5)  # 5 classes here, 3 in the adapter's trained head
    with torch.no_grad():
        y = model(x)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"head\.(weight|bias) has shape \(3(, 4)?,?\) in the file but \(5"):
        peft.PeftModel.from_pretrained(model, folder)
    assert_untouched(model, before, x, y)


def test_load_adapter_checks_a_second_adapter_and_keeps_the_first(tmp_path, base):
    good = saved_folder(tmp_path)
    bad = saved_folder(tmp_path, name="bad")
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])
    model, x, _ = base
    loaded = peft.PeftModel.from_pretrained(model, good)
    with torch.no_grad():
        y = loaded(x)
    layers = {name for name, m in loaded.named_modules() if isinstance(m, LieraLayer)}
    with pytest.raises(ValueError, match="truncated or corrupted"):
        loaded.load_adapter(bad, adapter_name="other")
    assert {name for name, m in loaded.named_modules() if isinstance(m, LieraLayer)} == layers
    assert all("other" not in m.liera_adapters for m in loaded.modules() if isinstance(m, LieraLayer))
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


@pytest.mark.parametrize("field, value, named", [("liera_alpha", -1.0, "liera_alpha"),
                                                  ("liera_dropout", 1.5, "liera_dropout")])
def test_config_errors_name_the_peft_field(tmp_path, base, field, value, named):
    with pytest.raises(ValueError) as err:
        LieraPeftConfig(target_modules=["a"], **{field: value})
    message = str(err.value)
    assert named in message and message.startswith("LieraPeftConfig:")
    assert not any(w in message.replace(named, "").split() for w in ("alpha", "dropout")), message
    folder = saved_folder(tmp_path)  # the same from a file, where the user wrote the PEFT field name
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model, x, y = base
    before = snapshot(model)
    with pytest.raises(ValueError, match=named):
        peft.PeftModel.from_pretrained(model, folder)
    assert_untouched(model, before, x, y)


def test_peft_field_names_keeps_alpha_pattern():
    text = "LieRAConfig: alpha must be positive; alpha_pattern['a'] too; a common choice is alpha = 2 * r."
    assert liera_peft.peft_field_names(text) == ("LieraPeftConfig: liera_alpha must be positive; alpha_pattern['a'] too; "
                                                 "a common choice is liera_alpha = 2 * r.")


@pytest.mark.parametrize("direction", ["liera_to_peft", "peft_to_liera"])
def test_conversions_never_overwrite_their_input(direction, tmp_path):
    """The library functions refuse as `liera convert` does, before anything is written."""
    import os

    from torch import nn

    import liera
    from liera.integrations import peft as peft_method

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    if direction == "liera_to_peft":
        liera.get_liera_model(model, liera.LieRAConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path / "a")
    else:
        peft.get_peft_model(model, peft_method.LieraPeftConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path / "a")
    before = {n: (tmp_path / "a" / n).read_bytes() for n in os.listdir(tmp_path / "a")}
    for out in (tmp_path / "a", tmp_path / "a" / "adapter_config.json"):
        with pytest.raises(ValueError, match="never overwrites its input"):
            getattr(peft_method, direction)(out if out.is_file() else tmp_path / "a", tmp_path / "a")
    assert {n: (tmp_path / "a" / n).read_bytes() for n in os.listdir(tmp_path / "a")} == before
