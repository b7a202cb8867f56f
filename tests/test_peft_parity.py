"""Parity with HF PEFT: our LoRA / DoRA give PEFT's numbers on the same model.

The same tiny model is built twice; ours gets inject_lora, PEFT's get_peft_model. Both get
PEFT's A and the same random non-zero B, so any difference is a difference in the maths.
"""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")  # the import takes a few seconds; once per module
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from _models import make_model, token_ids  # noqa: E402
from lora_edu import adapter_modules, count_trainable_params, inject_lora, merge_lora  # noqa: E402

TARGETS = ["q_proj", "v_proj", "fc1", "head"]
R, ALPHA = 4, 8


def peft_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(bias=True, rslora=False, dora=False, targets=TARGETS, set_b=True):
    """(ours, theirs, peft_layers): the same base, adapted both ways, with the same A and B."""
    base = make_model(0, bias=bias)
    ours = inject_lora(copy.deepcopy(base), targets, r=R, alpha=ALPHA, rslora=rslora, dora=dora)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0,
                        use_rslora=rslora, use_dora=dora)
    theirs = get_peft_model(copy.deepcopy(base), config)
    peft_layers = {n: m for n, m in theirs.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(peft_layers) == sorted(adapter_modules(ours))  # same modules matched
    if set_b:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, layer in adapter_modules(ours).items():
                layer.lora_A.copy_(peft_layers[name].lora_A["default"].weight)
                b = torch.randn(layer.lora_B.shape, generator=g) * 0.1
                layer.lora_B.copy_(b)
                peft_layers[name].lora_B["default"].weight.copy_(b)
    return ours, theirs, peft_layers


def grads(layer, peft_layer, dora):
    ours = [layer.lora_A.grad, layer.lora_B.grad]
    theirs = [peft_layer.lora_A["default"].weight.grad, peft_layer.lora_B["default"].weight.grad]
    if dora:
        ours.append(layer.magnitude.grad)
        theirs.append(peft_layer.lora_magnitude_vector["default"].weight.grad)
    return ours, theirs


def assert_forward_merge_and_count_match(ours, theirs, peft_layers, bias, atol):
    """Same output (and B matters), same trainable count, same merged weights and merged output."""
    ids = token_ids()
    with torch.no_grad():
        out_ours, out_peft = ours(ids), theirs(ids)
        assert not torch.allclose(out_ours, make_model(0, bias=bias)(ids), atol=1e-3)  # B matters
    torch.testing.assert_close(out_ours, out_peft, rtol=0, atol=atol)
    assert count_trainable_params(ours) == peft_trainable(theirs)

    merged_peft = theirs.merge_and_unload()
    merge_lora(ours)
    for name in peft_layers:
        torch.testing.assert_close(ours.get_submodule(name).base.weight, merged_peft.get_submodule(name).weight,
                                   rtol=0, atol=atol)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), merged_peft(ids), rtol=0, atol=atol)


# ------------------------------------------------------------------ plain LoRA and rsLoRA
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_forward_merge_and_count_match_peft(bias, rslora):
    ours, theirs, peft_layers = build(bias=bias, rslora=rslora)
    for name, layer in adapter_modules(ours).items():
        assert layer.scaling == pytest.approx(peft_layers[name].scaling["default"], rel=1e-12)

    assert_forward_merge_and_count_match(ours, theirs, peft_layers, bias, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_gradients_match_peft(rslora):
    ours, theirs, peft_layers = build(rslora=rslora)
    ids = token_ids()
    ours(ids).pow(2).mean().backward()
    theirs(ids).pow(2).mean().backward()
    for name, layer in adapter_modules(ours).items():
        for got, want in zip(*grads(layer, peft_layers[name], dora=False)):
            assert want is not None and torch.count_nonzero(want) > 0
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ DoRA
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_dora_magnitude_at_init_matches_peft(bias):
    ours, _, peft_layers = build(bias=bias, dora=True, set_b=False)
    for name, layer in adapter_modules(ours).items():
        torch.testing.assert_close(layer.magnitude, peft_layers[name].lora_magnitude_vector["default"].weight,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rslora", [False, True], ids=["dora", "dora_rslora"])
def test_dora_forward_merge_and_count_match_peft(bias, rslora):
    ours, theirs, peft_layers = build(bias=bias, rslora=rslora, dora=True)
    assert_forward_merge_and_count_match(ours, theirs, peft_layers, bias, atol=1e-5)


def test_dora_gradients_match_peft():
    ours, theirs, peft_layers = build(dora=True)
    ids = token_ids()
    ours(ids).pow(2).mean().backward()
    theirs(ids).pow(2).mean().backward()
    for name, layer in adapter_modules(ours).items():
        for got, want in zip(*grads(layer, peft_layers[name], dora=True)):
            assert want is not None and torch.count_nonzero(want) > 0
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ matching and errors
@pytest.mark.parametrize("targets", [["q_proj"], ["attn.v_proj"], ["layers.1.attn.q_proj"], ["head", "fc2"]])
def test_target_matching_agrees_with_peft(targets):
    build(targets=targets, set_b=False)  # build() asserts both adapted the same modules


def test_trainable_count_matches_peft_and_the_formula():
    ours, theirs, peft_layers = build(set_b=False)
    by_hand = sum(R * sum(m.base_layer.weight.shape) for m in peft_layers.values())
    assert count_trainable_params(ours) == peft_trainable(theirs) == by_hand


def test_target_that_matches_nothing_is_an_error_in_both():
    with pytest.raises(ValueError, match="nope"):
        get_peft_model(make_model(0), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["nope"]))
    with pytest.raises(ValueError, match="nope"):
        inject_lora(make_model(0), ["nope"], r=R, alpha=ALPHA)
