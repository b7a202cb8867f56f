"""lora_edu.methods.ia3 against HF PEFT's IA3Config, and (IA)^3's invariants and errors.

Both sides adapt copies of one model (a TinyLlama, and the TinyModel of _models.py, which has
biases) and get the same random vectors l = 1 + 0.3 * noise, as after training, so any
difference is one of arithmetic. Both compute l * (W x + b) or W (l * x) + b in float32 with
the same operations; the tolerance, 1e-5, covers a different order in a whole model's sums.
"""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")  # the import takes a few seconds; once per module
from peft import IA3Config, get_peft_model  # noqa: E402
from peft.tuners.ia3 import IA3Layer  # noqa: E402

from _models import OneLayer, assert_unchanged, make_model, snapshot, token_ids  # noqa: E402
from lora_edu import (AdapterFileError, adapter_modules, count_trainable_params, inject_lora,  # noqa: E402
                      load_adapter, merge_lora, read_adapter, save_adapter, unmerge_lora)
from lora_edu.memory.spec import count_params, get_preset, peft_params_for  # noqa: E402
from lora_edu.methods.ia3 import IA3Linear, ia3_param_count, inject_ia3  # noqa: E402
from lora_edu.methods.inject import wrap_modules  # noqa: E402
from lora_edu.tiny.model import TinyConfig, TinyLlama  # noqa: E402

LLAMA = (["k_proj", "v_proj", "down_proj"], ["down_proj"])  # the paper's choice, the defaults
BIASED = (["q_proj", "v_proj", "o_proj", "fc2", "head"], ["o_proj", "fc2"])  # non-square, with biases
CASES = {"tiny_llama": LLAMA, "biased": BIASED}
U32 = 2.0 ** -24  # float32's unit roundoff


def tiny_llama():
    """A TinyLlama with weights N(0, 0.1) (norm gains 1): every layer moves the logits by O(1)."""
    torch.manual_seed(0)
    model = TinyLlama(TinyConfig()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn(p.shape, generator=g))
    return model


def base_model(case):
    return tiny_llama() if case == "tiny_llama" else make_model(0)


def ids_for(case):
    return token_ids(vocab=32, seq=8) if case == "tiny_llama" else token_ids()


def build(case, randomise=True):
    """(base, ours, theirs, peft_layers) over copies of one model, with the same vectors l."""
    targets, ff = CASES[case]
    base = base_model(case)
    ours = inject_ia3(copy.deepcopy(base), targets, ff)
    theirs = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=targets, feedforward_modules=ff))
    peft_layers = {n: m for n, m in theirs.base_model.model.named_modules() if isinstance(m, IA3Layer)}
    assert sorted(peft_layers) == sorted(adapter_modules(ours))  # the same modules matched
    if randomise:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, layer in adapter_modules(ours).items():
                l = 1 + 0.3 * torch.randn(layer.ia3_l.shape, generator=g)
                layer.ia3_l.copy_(l)
                peft_layers[name].ia3_l["default"].copy_(l)
    return base, ours, theirs, peft_layers


def loss_of(model, ids):
    y = model(ids)
    return (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(11))).sum()


# ------------------------------------------------------------------ parity with PEFT
@pytest.mark.parametrize("case", CASES)
def test_same_parameters_as_peft_and_identity_at_init(case):
    base, ours, theirs, peft_layers = build(case, randomise=False)
    for name, layer in adapter_modules(ours).items():
        theirs_l = peft_layers[name].ia3_l["default"]
        assert layer.ia3_l.shape == theirs_l.shape  # [out, 1] or [1, in], as PEFT
        assert torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l)) and torch.equal(theirs_l, layer.ia3_l)
        assert layer.feedforward == peft_layers[name].is_feedforward
    ids = ids_for(case)
    with torch.no_grad():
        assert torch.equal(ours(ids), base(ids))  # l = 1: exactly the pretrained model


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_equal_peft(case):
    base, ours, theirs, peft_layers = build(case)
    ids = ids_for(case)
    loss_ours, loss_peft = loss_of(ours, ids), loss_of(theirs, ids)
    torch.testing.assert_close(loss_ours, loss_peft, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y = ours(ids)
        torch.testing.assert_close(y, theirs(ids), rtol=0, atol=1e-5)
        assert (y - base(ids)).abs().max() > 1e-2  # the vectors change the output
    loss_ours.backward()
    loss_peft.backward()
    for name, layer in adapter_modules(ours).items():
        want = peft_layers[name].ia3_l["default"].grad
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(layer.ia3_l.grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_merged_weights_biases_and_outputs_equal_peft(case):
    base, ours, theirs, peft_layers = build(case)
    ids = ids_for(case)
    with torch.no_grad():
        before = ours(ids)
    merged = theirs.merge_and_unload()
    merge_lora(ours)
    biases = 0
    for name, layer in adapter_modules(ours).items():
        assert layer.merged
        theirs_lin = merged.get_submodule(name)
        torch.testing.assert_close(layer.base.weight, theirs_lin.weight, rtol=0, atol=1e-6)
        if layer.base.bias is not None:
            biases += 1
            torch.testing.assert_close(layer.base.bias, theirs_lin.bias, rtol=0, atol=1e-6)
    assert biases == (9 if case == "biased" else 0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), before, rtol=0, atol=1e-5)  # merged = unmerged
        torch.testing.assert_close(ours(ids), merged(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_unmerge_equals_peft_and_restores_the_base(case):
    base, ours, theirs, peft_layers = build(case)
    merge_lora(ours)
    with pytest.warns(UserWarning, match="inaccurate"):  # PEFT warns that it divides
        for layer in peft_layers.values():
            layer.merge()
            layer.unmerge()
    unmerge_lora(ours)
    for name, layer in adapter_modules(ours).items():
        assert not layer.merged
        original = base.get_submodule(name)
        for tensor in ("weight", "bias"):
            got, want = getattr(layer.base, tensor), getattr(original, tensor)
            if want is None:
                continue
            torch.testing.assert_close(got, want, rtol=4 * U32, atol=0)  # W * l / l: two roundings
            # PEFT divides by l + 1e-8, which moves W by a further 1e-8 / |l| relative (this seed
            # draws an |l| of 0.004 in head: 2.7e-6); see the next test
            slack = 4 * U32 + 1e-8 / layer.ia3_l.abs().min().item()
            torch.testing.assert_close(got, getattr(peft_layers[name].base_layer, tensor), rtol=slack, atol=0)


def test_unmerge_divides_by_l_itself_where_peft_adds_1e_8():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    ours = IA3Linear(copy.deepcopy(linear))
    theirs = get_peft_model(OneLayer(copy.deepcopy(linear)), IA3Config(target_modules=["proj"],
                                                                      feedforward_modules=[]))
    peft_layer = theirs.base_model.model.proj
    with torch.no_grad():
        ours.ia3_l.fill_(1e-3)
        peft_layer.ia3_l["default"].fill_(1e-3)
    ours.merge(), ours.unmerge()
    with pytest.warns(UserWarning, match="inaccurate"):
        peft_layer.merge(), peft_layer.unmerge()
    w = linear.weight
    torch.testing.assert_close(ours.base.weight, w, rtol=4 * U32, atol=0)
    rel = ((peft_layer.base_layer.weight - w) / w).abs()
    torch.testing.assert_close(rel, torch.full_like(rel, 1e-5), rtol=0.01, atol=0)  # 1e-8 / l, everywhere


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_bf16_base_equals_peft(feedforward):
    """l stays float32 (PEFT upcasts it too); the scale is applied in float32 and rounded once."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 40).to(torch.bfloat16)
    ours = IA3Linear(copy.deepcopy(linear), feedforward=feedforward)
    theirs = get_peft_model(OneLayer(copy.deepcopy(linear)),
                            IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else []))
    l = 1 + 0.3 * torch.randn(ours.ia3_l.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours.ia3_l.copy_(l)
        theirs.base_model.model.proj.ia3_l["default"].copy_(l)
        x = torch.randn(6, 24, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
        y_ours, y_peft = ours(x), theirs(x)
    assert ours.ia3_l.dtype == theirs.base_model.model.proj.ia3_l["default"].dtype == torch.float32
    assert y_ours.dtype == torch.bfloat16 and torch.equal(y_ours, y_peft)  # the same operations, to the bit


# ------------------------------------------------------------------ the formulas, by hand
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_forward_and_merge_follow_the_formulas(feedforward):
    torch.manual_seed(0)
    layer = IA3Linear(nn.Linear(6, 5), feedforward=feedforward)
    l = torch.linspace(0.5, 1.5, 6 if feedforward else 5)
    with torch.no_grad():
        layer.ia3_l.copy_(l.view(layer.ia3_l.shape))
    w, b = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    x = torch.randn(3, 6)
    if feedforward:  # y = W (l * x) + b: the bias is not scaled;  merged W diag(l)
        want_y, want_w, want_b = (l * x) @ w.T + b, w @ torch.diag(l), b
    else:  # y = l * (W x + b): the bias is scaled too;  merged diag(l) W, l * b
        want_y, want_w, want_b = l * (x @ w.T + b), torch.diag(l) @ w, l * b
    assert not layer.merged_weight().requires_grad  # a constant, like what merge() writes
    torch.testing.assert_close(layer.merged_weight(), want_w, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want_y, rtol=0, atol=1e-6)
        layer.merge()
        torch.testing.assert_close(layer.base.weight, want_w, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.base.bias, want_b, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), want_y, rtol=0, atol=1e-6)


def test_merge_and_unmerge_are_no_ops_when_repeated():
    layer = IA3Linear(nn.Linear(4, 3))
    with torch.no_grad():
        layer.ia3_l.fill_(2.0)
    w0 = layer.base.weight.detach().clone()
    layer.merge(), layer.merge()
    assert torch.equal(layer.base.weight, 2 * w0)  # scaled once, not twice
    layer.unmerge(), layer.unmerge()
    assert torch.equal(layer.base.weight, w0)  # a power of two divides exactly


# ------------------------------------------------------------------ what trains, and how much
def test_trainable_counts_equal_peft_and_the_hand_formula():
    base, ours, theirs, _ = build("tiny_llama", randomise=False)
    cfg = base.config
    hand = cfg.n_layer * (cfg.d_model + cfg.d_model + cfg.d_ff)  # l_k [d], l_v [d], l_ff [d_ff]
    peft_count = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    shapes = [(m.out_features, m.in_features, m.feedforward) for m in adapter_modules(ours).values()]
    assert count_trainable_params(ours) == peft_count == hand == ia3_param_count(shapes) == 600
    assert {n.rsplit(".", 1)[-1] for n, p in ours.named_parameters() if p.requires_grad} == {"ia3_l"}
    total = count_params(base)
    assert total == 103_232 and f"{hand / total:.3%}" == "0.581%"  # the chapter's table


def test_llama_7b_count_by_hand():
    n_layer, d, d_ff = 32, 4096, 11008
    shapes = [s for _ in range(n_layer) for s in ((d, d, False), (d, d, False), (d, d_ff, True))]
    assert ia3_param_count(shapes) == n_layer * (2 * d + d_ff) == 614_400
    spec = get_preset("llama-7b")  # an independent count, lora_edu.memory.spec's
    assert peft_params_for(spec, "ia3", ("k", "v", "down")) == 614_400
    assert f"{614_400 / count_params(spec):.4%}" == "0.0091%"


@pytest.mark.parametrize("shapes", [[(4, 0, False)], [(4, 4, "yes")], [(4.0, 4, False)], [(True, 4, False)]])
def test_param_count_refuses_bad_shapes(shapes):
    with pytest.raises(ValueError, match=r"\(out, in, feedforward\) triples"):
        ia3_param_count(shapes)


# ------------------------------------------------------------------ bad input: a clear error, nothing changed
def refused(model, call, match, error=ValueError):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(model, before)


def test_feedforward_modules_must_be_targets_as_in_peft():
    with pytest.raises(ValueError, match="subset"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    model = tiny_llama()
    refused(model, lambda: inject_ia3(model, ["k_proj", "v_proj"], ["down_proj"]),
            r"feedforward_modules \['down_proj'\] are not in target_modules \['k_proj', 'v_proj'\]")


@pytest.mark.parametrize("targets, match", [
    (["k_proj", "norm"], r"\['norm'\] matched no nn\.Linear"),  # an RMSNorm, not a Linear
    (["embed_tokens"], r"\['embed_tokens'\] matched no nn\.Linear"),
    (["k_proj", "nope"], r"\['nope'\] matched no nn\.Linear.*'down_proj'"),  # names the layers there are
])
def test_targets_that_match_no_linear_are_refused(targets, match):
    model = tiny_llama()
    refused(model, lambda: inject_ia3(model, targets, []), match)


def test_a_model_with_adapters_is_refused():
    model = inject_lora(tiny_llama(), ["q_proj"], r=2)
    refused(model, lambda: inject_ia3(model), "already has adapter layers; call inject_ia3 once")
    model = inject_ia3(tiny_llama())
    refused(model, lambda: inject_ia3(model), "already has adapter layers")


@pytest.mark.parametrize("kw, match", [
    ({"target_modules": [3]}, "target_modules must be a"),
    ({"target_modules": []}, "target_modules must be a"),
    ({"feedforward_modules": 5}, "feedforward_modules must be a list of module names"),
    ({"feedforward_modules": [""]}, "feedforward_modules must be a list of module names"),
])
def test_bad_types_for_inject(kw, match):
    model = tiny_llama()
    refused(model, lambda: inject_ia3(model, **kw), match)


def test_bad_types_for_the_layer():
    with pytest.raises(TypeError, match="IA3Linear wraps an nn.Linear, got Conv1d"):
        IA3Linear(nn.Conv1d(3, 3, 1))
    linear = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="feedforward must be True"):
        IA3Linear(linear, feedforward="yes")
    assert linear.weight.requires_grad  # a refused base is not frozen


def test_a_zero_in_l_is_refused_at_unmerge_and_the_layer_stays_merged():
    layer = IA3Linear(nn.Linear(4, 3))
    with torch.no_grad():
        layer.ia3_l[1] = 0.0
    layer.merge()  # merging is fine (inference), but row 1 of W and b is now 0
    w, b = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    with pytest.raises(ValueError, match=r"cannot unmerge: ia3_l is 0 at 1 position\(s\) \[1\].*rows of W"):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.base.weight, w) and torch.equal(layer.base.bias, b)
    assert torch.isfinite(layer.base.weight).all()


def test_unmerge_lora_refuses_before_unmerging_any_layer():
    # the zero sits in the last layer unmerge_lora visits: the earlier ones must stay merged too
    model = inject_ia3(make_model(bias=True), ["v_proj", "fc2"], feedforward_modules=["fc2"])
    layers = list(adapter_modules(model).values())
    with torch.no_grad():
        layers[-1].ia3_l[0, 0] = 0.0
    merge_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot unmerge"):
        unmerge_lora(model)
    assert all(layer.merged for layer in layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_non_finite_l_is_refused_at_merge():
    layer = IA3Linear(nn.Linear(4, 3), feedforward=True)
    with torch.no_grad():
        layer.ia3_l[0, 2] = float("nan")
    w = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match="cannot merge: ia3_l holds inf or NaN"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w)


# ------------------------------------------------------------------ adapter files
def trained_ia3(case="biased"):
    _, ours, _, _ = build(case)
    return ours


def test_file_round_trip_into_an_injected_model_is_bit_exact(tmp_path):
    model, path = trained_ia3(), tmp_path / "ia3.safetensors"
    save_adapter(model, path)
    config, tensors = read_adapter(path)
    assert config["method"] == "ia3" and config["feedforward_modules"] == [
        "layers.0.attn.o_proj", "layers.0.mlp.fc2", "layers.1.attn.o_proj", "layers.1.mlp.fc2"]
    fresh = inject_ia3(make_model(0), *BIASED)
    load_adapter(fresh, path)
    for name, layer in adapter_modules(model).items():
        assert torch.equal(adapter_modules(fresh)[name].ia3_l, layer.ia3_l)
    with torch.no_grad():
        assert torch.equal(fresh(token_ids()), model(token_ids()))


def test_for_loading_with_the_module_name_rebuilds_the_layers(tmp_path):
    """What load_adapter does on a model without adapters, once it passes each module's name."""
    model, path = trained_ia3(), tmp_path / "ia3.safetensors"
    save_adapter(model, path)
    config, _ = read_adapter(path)
    fresh = wrap_modules(make_model(0), config["targets"],
                         lambda name, base: IA3Linear.for_loading(base, config, name=name))
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(token_ids()), model(token_ids()))
    assert count_trainable_params(fresh) == count_trainable_params(model)  # only the vectors train


def test_file_round_trip_into_a_fresh_model(tmp_path):
    # load_adapter builds the layers itself; which ones scale their input comes from the file
    model, path = trained_ia3(), tmp_path / "ia3.safetensors"
    save_adapter(model, path)
    fresh = load_adapter(make_model(0), path)
    assert {n: m.feedforward for n, m in adapter_modules(fresh).items()} == \
        {n: m.feedforward for n, m in adapter_modules(model).items()}
    with torch.no_grad():
        assert torch.equal(fresh(token_ids()), model(token_ids()))


def test_a_file_with_other_feedforward_modules_is_refused(tmp_path):
    path = tmp_path / "ia3.safetensors"
    save_adapter(trained_ia3(), path)
    other = inject_ia3(make_model(0), BIASED[0], ["fc2"])
    refused(other, lambda: load_adapter(other, path), "saved with another config", AdapterFileError)


def test_a_layer_not_made_by_inject_cannot_be_saved(tmp_path):
    model = OneLayer(IA3Linear(nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="not made by inject_ia3"):
        save_adapter(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("config, match", [
    ({"method": "ia3"}, "needs"),
    ({"method": "ia3", "feedforward_modules": "fc2"}, "must be a list of module names"),
    ({"method": "ia3", "feedforward_modules": ["fc2"], "targets": ["fc1"]}, r"\['fc2'\] are not adapted"),
])
def test_check_config_names_the_problem(config, match):
    with pytest.raises((TypeError, ValueError), match=match):
        IA3Linear.check_config(config)
