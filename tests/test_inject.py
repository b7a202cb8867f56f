"""lora_edu.methods.inject: target matching, freezing, parameter counts, merging a whole model."""

import pytest
import torch
from torch import nn

from _models import (assert_unchanged, make_model, names_ending_with, randomise_adapters_, snapshot,
                     token_ids)
from lora_edu import (DoRALinear, LoRALinear, adapter_modules, count_trainable_params, inject_lora,
                      lora_param_count, mark_only_lora_trainable, merge_lora, unmerge_lora)

R = 4


def wrapped_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


def weight_shapes(model, names):
    return [tuple(model.get_submodule(n).weight.shape) for n in names]


# ------------------------------------------------------------------ matching
def test_short_name_matches_dotted_suffix_but_not_a_longer_name():
    model = make_model()
    inject_lora(model, ["q_proj"], r=R)
    names = wrapped_names(model)
    assert names == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]
    assert all(isinstance(model.get_submodule(f"layers.{i}.attn.qq_proj"), nn.Linear) for i in (0, 1))
    assert not any(isinstance(model.get_submodule(f"layers.{i}.attn.qq_proj"), LoRALinear) for i in (0, 1))


@pytest.mark.parametrize("target, expected", [
    ("layers.1.attn.q_proj", ["layers.1.attn.q_proj"]),            # exact full name
    ("attn.v_proj", ["layers.0.attn.v_proj", "layers.1.attn.v_proj"]),  # multi-part suffix
    ("1.attn.v_proj", ["layers.1.attn.v_proj"]),
    ("head", ["head"]),                                             # top-level exact name
    ("fc2", ["layers.0.mlp.fc2", "layers.1.mlp.fc2"]),
])
def test_exact_and_suffix_matching(target, expected):
    model = make_model()
    inject_lora(model, [target], r=R)
    assert wrapped_names(model) == expected


def test_str_target_is_the_same_as_a_one_element_list():
    a, b = make_model(), make_model()
    inject_lora(a, "v_proj", r=R)
    inject_lora(b, ["v_proj"], r=R)
    assert wrapped_names(a) == wrapped_names(b) == names_ending_with(make_model(), "v_proj")


def test_wrapped_layer_keeps_the_original_linear_as_base():
    model = make_model()
    original = model.layers[0].attn.q_proj
    inject_lora(model, ["q_proj"], r=R)
    assert model.layers[0].attn.q_proj.base is original


# ------------------------------------------------------------------ freezing and counting
@pytest.mark.parametrize("dora", [False, True])
def test_only_adapter_parameters_are_trainable(dora):
    model = make_model()
    inject_lora(model, ["q_proj", "fc1"], r=R, dora=dora)
    allowed = {"lora_A", "lora_B", "magnitude"} if dora else {"lora_A", "lora_B"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in allowed for n in trainable)
    assert not model.embed.weight.requires_grad
    assert not model.layers[0].norm.weight.requires_grad
    assert not model.head.weight.requires_grad
    assert not model.layers[0].attn.q_proj.base.weight.requires_grad


def test_trainable_count_equals_r_times_d_plus_k():
    targets = ["q_proj", "v_proj", "fc1", "fc2"]
    base = make_model()
    names = [n for t in targets for n in names_ending_with(base, t)]
    shapes = weight_shapes(base, names)
    by_hand = sum(R * (d + k) for d, k in shapes)

    model = inject_lora(make_model(), targets, r=R)
    assert count_trainable_params(model) == lora_param_count(shapes, R) == by_hand
    assert len(adapter_modules(model)) == len(names)


def test_dora_injection_makes_dora_layers_and_counts_magnitudes():
    base = make_model()
    names = names_ending_with(base, "v_proj") + names_ending_with(base, "fc1")
    shapes = weight_shapes(base, names)
    model = inject_lora(make_model(), ["v_proj", "fc1"], r=R, dora=True)
    assert all(isinstance(model.get_submodule(n), DoRALinear) for n in names)
    assert count_trainable_params(model) == sum(R * (d + k) + d for d, k in shapes)  # + one magnitude per row


def test_lora_param_count_of_a_4096_square_layer():
    n = lora_param_count([(4096, 4096)], 8)
    assert n == 8 * (4096 + 4096) == 65536
    assert 4096 * 4096 / n == 256


def test_lora_param_count_rejects_bad_input():
    with pytest.raises(ValueError, match="r must be a positive int"):
        lora_param_count([(4, 4)], 0)
    with pytest.raises(ValueError, match="layer shapes must be positive"):
        lora_param_count([(4, 0)], 2)


def test_count_trainable_params_counts_scalars_with_requires_grad():
    layer = nn.Linear(3, 2)
    assert count_trainable_params(layer) == 3 * 2 + 2
    layer.bias.requires_grad_(False)
    assert count_trainable_params(layer) == 3 * 2


def test_mark_only_lora_trainable_refreezes_everything_else():
    model = inject_lora(make_model(), ["q_proj"], r=R, dora=True)
    expected = count_trainable_params(model)
    model.requires_grad_(True)  # as if someone unfroze the whole model
    mark_only_lora_trainable(model)
    assert count_trainable_params(model) == expected
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == \
        {"lora_A", "lora_B", "magnitude"}


def test_adapter_modules_lists_layers_by_name():
    model = inject_lora(make_model(), ["o_proj"], r=R)
    layers = adapter_modules(model)
    assert sorted(layers) == names_ending_with(make_model(), "o_proj")
    assert all(layers[n] is model.get_submodule(n) for n in layers)
    assert adapter_modules(make_model()) == {}


# ------------------------------------------------------------------ whole-model behaviour
@pytest.mark.parametrize("dora", [False, True])
def test_injected_model_starts_equal_to_the_base(dora):
    ids = token_ids()
    with torch.no_grad():
        before = make_model()(ids)
        after = inject_lora(make_model(), ["q_proj", "v_proj", "fc2"], r=R, dora=dora)(ids)
    if dora:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    else:
        assert torch.equal(after, before)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_and_unmerge_a_whole_model_keep_outputs(dora):
    model = inject_lora(make_model(), ["q_proj", "v_proj", "fc1", "head"], r=R, dora=dora)
    randomise_adapters_(model)
    ids = token_ids()
    w0 = {n: m.base.weight.detach().clone() for n, m in adapter_modules(model).items()}
    with torch.no_grad():
        unmerged = model(ids)
        assert not torch.allclose(unmerged, make_model()(ids), atol=1e-3)
        assert merge_lora(model) is model
        assert all(m.merged for m in adapter_modules(model).values())
        torch.testing.assert_close(model(ids), unmerged, rtol=0, atol=1e-5)
        assert unmerge_lora(model) is model
        assert not any(m.merged for m in adapter_modules(model).values())
        torch.testing.assert_close(model(ids), unmerged, rtol=0, atol=1e-5)
    for n, m in adapter_modules(model).items():
        torch.testing.assert_close(m.base.weight.detach(), w0[n], rtol=0, atol=1e-5)


def test_injection_passes_hyper_parameters_through():
    model = inject_lora(make_model(), ["fc1"], r=2, alpha=6, dropout=0.25, rslora=True)
    for layer in adapter_modules(model).values():
        assert layer.r == 2 and layer.alpha == 6 and layer.rslora and layer.dropout_p == 0.25
        assert layer.scaling == pytest.approx(6 / 2 ** 0.5)
        assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.25


# ------------------------------------------------------------------ bad input leaves the model alone
@pytest.mark.parametrize("kw, exc, msg", [
    (dict(r=0), ValueError, "r must be a positive int"),
    (dict(r=-1), ValueError, "r must be a positive int"),
    (dict(r=2.5), TypeError, "r must be a positive int"),
    (dict(r="8"), TypeError, "r must be a positive int"),
    (dict(r=True), TypeError, "r must be a positive int"),
    (dict(alpha=0), ValueError, "alpha must be a positive, finite number"),
    (dict(alpha=-2.0), ValueError, "alpha must be a positive, finite number"),
    (dict(dropout=-0.1), ValueError, r"dropout must be a probability in \[0, 1\)"),
    (dict(dropout=1.0), ValueError, r"dropout must be a probability in \[0, 1\)"),
    (dict(bypass_dtype=torch.int8), ValueError, r"bypass_dtype must be None .* got torch.int8"),
    (dict(bypass_dtype="bf16"), ValueError, r"bypass_dtype must be None"),
])
def test_bad_hyper_parameters_raise_and_leave_model_unchanged(kw, exc, msg):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(exc, match=msg):
        inject_lora(model, ["q_proj"], **kw)
    assert_unchanged(model, before)


def test_target_that_matches_nothing_names_it_and_lists_linears():
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['k_proj'\] matched no nn\.Linear") as err:
        inject_lora(model, ["k_proj"], r=R)
    message = str(err.value)
    for existing in ("q_proj", "qq_proj", "v_proj", "o_proj", "fc1", "fc2", "head"):
        assert existing in message
    assert_unchanged(model, before)


def test_mix_of_matching_and_missing_targets_is_an_error_and_changes_nothing():
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['nope'\] matched no nn\.Linear") as err:
        inject_lora(model, ["q_proj", "nope"], r=R)
    assert "q_proj" not in str(err.value).split("matched")[0]  # only the missing one is blamed
    assert_unchanged(model, before)


@pytest.mark.parametrize("target", ["_proj", "proj", "attn", "embed", "norm", "layers.0"])
def test_partial_names_and_non_linear_modules_do_not_match(target):
    # suffixes match whole dotted components only, and only nn.Linear layers are adapted
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"'{target}'"):
        inject_lora(model, [target], r=R)
    assert_unchanged(model, before)


@pytest.mark.parametrize("targets", [[], "", [""], ["q_proj", 3]])
def test_empty_or_non_string_targets(targets):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        inject_lora(model, targets, r=R)
    assert_unchanged(model, before)


def test_exclude_removes_candidates_before_matching():
    from lora_edu.methods.inject import resolve_targets

    model = make_model()
    assert resolve_targets(model, ["q_proj"]) == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]
    assert resolve_targets(model, ["q_proj"], exclude=["layers.0.attn.q_proj"]) == ["layers.1.attn.q_proj"]
    # a target left with nothing but excluded layers is an error, not an empty match
    with pytest.raises(ValueError, match=r"\['head'\] matched no nn\.Linear") as err:
        resolve_targets(model, ["head", "q_proj"], exclude=["head"])
    assert "'head'" not in str(err.value).split("Linear layers in this model")[1]  # nor listed as a candidate


def test_injecting_twice_is_an_error_and_changes_nothing():
    model = inject_lora(make_model(), ["q_proj"], r=R)
    randomise_adapters_(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has adapter layers"):
        inject_lora(model, ["v_proj"], r=R)
    with pytest.raises(ValueError, match="already has adapter layers"):
        inject_lora(model, ["q_proj"], r=R)
    assert_unchanged(model, before)
