"""liera.apps.prune: Wanda and magnitude pruning checked against their formulas on small tensors, layer order (each
layer's norms taken after the earlier ones are pruned), N:M, the errors, and re-masking."""
import copy

import pytest
import torch
from torch import nn

import liera
from liera.apps.prune import (
    PruneSpec,
    apply_zero_masks,
    deployed_sparsity,
    magnitude_mask,
    parse_prune,
    prune_model,
    wanda_mask,
    zero_masks,
)
from liera.sparsity import nm_valid, same_zeros


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def wanda_reference(weight, x, fraction):
    """Per output row, zero the int(fraction * in) entries of lowest |W_ij| * ||X_j||_2, written out with loops."""
    norm = x.detach().reshape(-1, x.shape[-1]).pow(2).sum(0).sqrt()
    out = weight.detach().clone()
    k = int(weight.shape[1] * fraction)
    for i in range(weight.shape[0]):
        scores = [(abs(float(weight[i, j].detach())) * float(norm[j]), j) for j in range(weight.shape[1])]
        for _, j in sorted(scores)[:k]:
            out[i, j] = 0.0
    return out


def test_parse_prune():
    assert parse_prune("wanda:0.5") == PruneSpec("wanda", sparsity=0.5)
    assert parse_prune("0.6") == PruneSpec("wanda", sparsity=0.6)
    assert parse_prune("2:4") == PruneSpec("wanda", nm=(2, 4))
    assert parse_prune("magnitude:2:4") == PruneSpec("magnitude", nm=(2, 4))
    assert str(parse_prune("magnitude:0.5")) == "magnitude:0.5" and parse_prune("2:4").target_fraction == 0.5
    for bad, why in (("sparsegpt:0.5", "unknown method"), ("wanda:1.5", r"in \(0, 1\)"), ("4:2", "0 < N < M"),
                     ("wanda:1:2:4", "not METHOD:AMOUNT")):
        with pytest.raises(ValueError, match=why):
            parse_prune(bad)


def test_magnitude_unstructured_prunes_the_smallest_of_the_layer():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    mask = magnitude_mask(w, 0.3)
    assert int(mask.sum()) == 18
    assert w[mask].abs().max() < w[~mask].abs().min(), "one threshold over the whole layer"
    assert mask.sum(1).unique().numel() > 1, "not per row"


@pytest.mark.parametrize("shape,dim", [((4, 8), 1), ((3, 8, 3, 3), 1), ((8, 5), 0)])
def test_magnitude_nm_keeps_the_largest_n_of_every_m(shape, dim):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    pruned = w.masked_fill(magnitude_mask(w, nm=(2, 4), dim=dim), 0.0)
    assert nm_valid(pruned, 2, 4, dim=dim) and int((pruned == 0).sum()) == w.numel() // 2
    groups = w.movedim(dim, -1).reshape(-1, 4).abs()
    kept = pruned.movedim(dim, -1).reshape(-1, 4) != 0
    top2 = torch.zeros_like(kept).scatter_(1, groups.topk(2, dim=1).indices, True)
    assert torch.equal(kept, top2)


def test_wanda_mask_matches_the_formula_unstructured_and_nm():
    torch.manual_seed(0)
    w, x = torch.randn(5, 8), torch.randn(40, 8) * torch.linspace(0.1, 3.0, 8)
    norm = x.pow(2).sum(0).sqrt()
    pruned = w.masked_fill(wanda_mask(w, norm, 0.5), 0.0)
    assert torch.equal(pruned, wanda_reference(w, x, 0.5))
    assert not torch.equal(pruned, w.masked_fill(magnitude_mask(w, 0.5), 0.0)), "the norms matter"
    nm = w.masked_fill(wanda_mask(w, norm, nm=(2, 4)), 0.0)
    assert nm_valid(nm, 2, 4)
    score = (w.abs() * norm).reshape(-1, 4)
    assert torch.equal((nm.reshape(-1, 4) != 0), torch.zeros_like(score, dtype=torch.bool).scatter_(
        1, score.topk(2, dim=1).indices, True))


def test_wanda_prunes_layers_in_order_with_norms_after_earlier_pruning():
    model, x = mlp(), torch.randn(3, 16, 8)
    dense = copy.deepcopy(model)
    result = prune_model(model, "wanda:0.5", target_modules=["0", "2"], calibration=[x[:2], x[2:]])
    w0 = wanda_reference(dense[0].weight, x, 0.5)
    assert torch.equal(model[0].weight, w0)
    h = torch.relu(nn.functional.linear(x, w0, dense[0].bias))  # layer 2 sees the pruned layer 0's output
    assert torch.equal(model[2].weight, wanda_reference(dense[2].weight, h, 0.5))
    h_dense = torch.relu(dense[0](x)).detach()
    assert not torch.equal(model[2].weight, wanda_reference(dense[2].weight, h_dense, 0.5)), "order matters here"
    assert torch.equal(model[4].weight, dense[4].weight), "untargeted layers stay as they were"
    assert [r.key for r in result.rows] == ["0.weight", "2.weight"] and result.fraction == 0.5
    assert (model[0].weight == 0).sum(1).tolist() == [4] * 12, "per output row"
    assert not torch.signbit(model[0].weight[model[0].weight == 0]).any(), "pruned entries are +0.0"

    grouped = mlp()  # one stage for both (the empty match): layer 2's norms come from the dense layer 0, as in
    prune_model(grouped, "wanda:0.5", target_modules=["0", "2"], calibration=[x], stage_pattern=r"")  # a block pass
    assert torch.equal(grouped[2].weight, wanda_reference(dense[2].weight, h_dense, 0.5))


def test_wanda_nm_and_gpt2_conv1d_layout():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 8))  # weight (in=8, out=6)
    x = torch.randn(4, 5, 8)
    dense = model[0].weight.detach().clone()
    prune_model(model, "wanda:0.5", target_modules=["0"], calibration=[x])
    assert torch.equal(model[0].weight.t(), wanda_reference(dense.t(), x, 0.5))
    model2 = nn.Sequential(Conv1D(6, 8))
    prune_model(model2, "2:4", target_modules=["0"], calibration=[x])
    assert nm_valid(model2[0].weight, 2, 4, dim=0) and not nm_valid(model2[0].weight, 2, 4, dim=1)


def test_magnitude_on_convs_skips_what_cannot_hold_nm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    result = prune_model(model, "magnitude:2:4", target_modules="all-conv")
    assert list(result.skipped) == ["0.weight"] and [r.key for r in result.rows] == ["1.weight"]
    assert nm_valid(model[1].weight, 2, 4) and not (model[0].weight == 0).any()
    with pytest.raises(ValueError, match="cannot hold the pattern"):
        prune_model(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)), "magnitude:2:4", target_modules="all-conv",
                    strict_nm=True)
    result = prune_model(model, "magnitude:0.5", target_modules="all-conv")
    assert [round(r.fraction, 3) for r in result.rows] == [0.5, 0.5]


def test_errors_name_the_fix_and_change_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Prune convolutions and other weights with magnitude"):
        prune_model(model, "wanda:0.5", target_modules=["0", "2"], calibration=[torch.randn(1, 3, 3, 3)])
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune_model(model, "wanda:0.5", target_modules=["2"])
    with pytest.raises(ValueError, match="never saw a non-zero input"):
        prune_model(model, "wanda:0.5", target_modules=["2"], calibration=[torch.randn(1, 3, 3, 3)],
                    run=lambda m, batch: m[0](batch))  # the forward never reaches layer 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    lm = liera.get_liera_model(model, liera.LieRAConfig(target_modules=["2"]))
    with pytest.raises(ValueError, match="prune the base model first"):
        prune_model(lm, "magnitude:0.5", target_modules=["2"])


def test_remasking_a_merged_lora_and_the_deployed_sparsity_of_keep_zeros():
    model = mlp()
    prune_model(model, "magnitude:0.5", target_modules=["0", "2"])
    masks = zero_masks(model, ["0.weight", "2.weight"])
    pruned = {k: model.get_parameter(k).detach().clone() for k in masks}
    lora = liera.get_liera_model(copy.deepcopy(model), liera.LieRAConfig(r=2, target_modules=["0", "2"],
                                                                         update="additive"))
    lora_zero = liera.get_liera_model(copy.deepcopy(model), liera.LieRAConfig(r=2, target_modules=["0", "2"],
                                                                              update="additive", keep_zeros=True))
    for lm in (lora, lora_zero):
        for p in lm.parameters():
            if p.requires_grad:
                with torch.no_grad():
                    p.add_(0.3)
    assert [round(r.fraction, 2) for r in deployed_sparsity(lora)] == [0.0, 0.0]
    assert [r.fraction for r in deployed_sparsity(lora_zero)] == [0.5, 0.5]
    merged = lora.merge_and_unload()
    assert apply_zero_masks(merged, masks) == sum(int(m.sum()) for m in masks.values())
    kept = lora_zero.merge_and_unload()
    for k in masks:
        assert same_zeros(pruned[k], merged.get_parameter(k)) and same_zeros(pruned[k], kept.get_parameter(k))


def test_the_sparse_recovery_example_keeps_every_zero(tmp_path):
    pytest.importorskip("sklearn")
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "sparse_recovery.py"
    spec = importlib.util.spec_from_file_location("liera_example_sparse_recovery", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pruned_sparsity"] == 0.5
    for arm in ("liera-rms", "masked-lora"):
        assert metrics[arm]["every_zero_kept"] and metrics[arm]["merged_sparsity"] == 0.5
        assert metrics[arm]["layers_2_4_valid"] == 2
    assert not metrics["lora"]["every_zero_kept"] and metrics["lora"]["layers_2_4_valid"] == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
