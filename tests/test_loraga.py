"""lora_edu.methods.loraga: the gradient estimate and LoRAGALinear against HF PEFT's LoraGAConfig.

PEFT's side: preprocess_loraga (gradients accumulated in .grad over a train_step, divided by
the number of backward passes) and get_peft_model with init_lora_weights="lora_ga". Both
sides take randomised SVDs (torch.svd_lowrank) from torch's global RNG, which PEFT also spends
on its default init first; the tests reseed inside torch.svd_lowrank so that both get the
same draws, and then compare A0, B0, the shifted base and the forward exactly (to float32).
The claim of the paper is checked on its own: the first SGD step of LoRA-GA points closer to
full fine-tuning's first step than plain LoRA's does, and it is the hand formula
dW = -lr s^2 (G A0^T A0 + B0 B0^T G) to first order in lr.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")  # a few seconds to import; once per module
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.config import LoraGAConfig  # noqa: E402
from peft.tuners.lora.loraga import preprocess_loraga  # noqa: E402

from _models import assert_unchanged, make_model, randomise_adapters_, snapshot, token_ids  # noqa: E402
from lora_edu import adapter_modules, inject_lora, load_adapter, save_adapter  # noqa: E402
from lora_edu.methods.loraga import LoRAGALinear, estimate_full_gradients, inject_loraga  # noqa: E402
from lora_edu.methods.shifted import convert_to_lora  # noqa: E402
from lora_edu.tiny.model import TinyConfig, TinyLlama, lm_loss  # noqa: E402
from lora_edu.tiny.tasks import FINETUNE, make_batches  # noqa: E402

TARGETS = ["q_proj", "v_proj", "fc1"]  # v_proj is [8, 16]: r = 4 is its largest LoRA-GA rank
R, ALPHA = 2, 8
# PEFT's gradient count uses a full backward hook, which warns on the first layer (its input needs no grad)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def loss_fn(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


BATCHES = [token_ids(seed=s, batch=4, seq=6) for s in (11, 12, 13)]


@pytest.fixture
def seeded_svd_lowrank(monkeypatch):
    """torch.svd_lowrank, reseeded before each call on both sides: the same random draws."""
    original = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(1234)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)


def peft_loraga(direction="ArB2r", scale="stable", gamma=16, rslora=False):
    """(PEFT model, {name: the gradient preprocess_loraga estimated}) on make_model(0)."""
    model = make_model(0)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga", use_rslora=rslora,
                        lora_ga_config=LoraGAConfig(direction=direction, scale=scale, stable_gamma=gamma))

    def train_step():
        for ids in BATCHES:
            loss_fn(model, ids).backward()

    preprocess_loraga(model, config, train_step)
    grads = {n: m._peft_loraga_grad.clone() for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")}
    return get_peft_model(model, config), grads


# ------------------------------------------------------------------ the gradient
def test_gradient_equals_peft_and_a_hand_average():
    _, peft_grads = peft_loraga()
    model = make_model(0)
    ours = estimate_full_gradients(model, TARGETS, BATCHES, loss_fn)
    assert sorted(ours) == sorted(peft_grads) and len(ours) == 6
    by_hand = copy.deepcopy(model)
    for name, g in ours.items():
        torch.testing.assert_close(g, peft_grads[name], rtol=0, atol=1e-7)
        w = by_hand.get_submodule(name).weight
        mean = sum(torch.autograd.grad(loss_fn(by_hand, ids), w)[0] for ids in BATCHES) / len(BATCHES)
        torch.testing.assert_close(g, mean, rtol=0, atol=1e-7)
        assert g.abs().max() > 1e-4


def test_gradient_estimate_leaves_flags_grads_and_mode_as_they_were():
    model = make_model(0)
    model.eval()
    model.head.weight.requires_grad_(False)
    sentinel = torch.full_like(model.layers[0].attn.q_proj.weight, 7.0)
    model.layers[0].attn.q_proj.weight.grad = sentinel.clone()
    before = snapshot(model)
    estimate_full_gradients(model, TARGETS, BATCHES, loss_fn)
    assert_unchanged(model, before)
    assert not model.training
    assert torch.equal(model.layers[0].attn.q_proj.weight.grad, sentinel)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "layers.0.attn.q_proj.weight")


def test_gradient_estimate_refuses_unused_layers_empty_batches_and_adapted_models():
    model = make_model(0)
    before = snapshot(model)

    def first_block_only(m, ids):
        return m.layers[0].attn.q_proj(m.embed(ids)).square().mean()

    with pytest.raises(ValueError, match="does not depend on 'layers.1.attn.q_proj'"):
        estimate_full_gradients(model, ["q_proj"], BATCHES, first_block_only)
    with pytest.raises(ValueError, match="batches is empty"):
        estimate_full_gradients(model, ["q_proj"], [], loss_fn)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        estimate_full_gradients(model, ["nope"], BATCHES, loss_fn)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="already has adapter layers"):
        estimate_full_gradients(inject_lora(make_model(0), ["q_proj"]), ["v_proj"], BATCHES, loss_fn)


# ------------------------------------------------------------------ the init against PEFT
@pytest.mark.parametrize("direction, scale, rslora", [
    ("ArB2r", "stable", False),  # PEFT's defaults
    ("ArB2r", "stable", True),
    ("A2rBr", "unit", False), ("ArBr", "gd_scale", False), ("random", "weight_svd", False),
    ("ArB2r", "weight_svd", False), ("ArBr", "stable", False),
])
def test_init_equals_peft(seeded_svd_lowrank, direction, scale, rslora):
    theirs, grads = peft_loraga(direction, scale, rslora=rslora)
    ours = inject_loraga(make_model(0), TARGETS, grads, r=R, alpha=ALPHA, direction=direction, scale=scale,
                         rslora=rslora)
    layers = adapter_modules(ours)
    assert sorted(layers) == sorted(grads)
    for name, layer in layers.items():
        peft_mod = theirs.base_model.model.get_submodule(name)
        a, b = peft_mod.lora_A["default"].weight, peft_mod.lora_B["default"].weight
        assert layer.scaling == peft_mod.scaling["default"]
        torch.testing.assert_close(layer.lora_A0, a, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.lora_B0, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.base.weight, peft_mod.base_layer.weight, rtol=0, atol=1e-6)
        assert b.abs().max() > 0 and torch.equal(layer.lora_A, layer.lora_A0)
    ids = token_ids()
    with torch.no_grad():
        y = ours(ids)
        torch.testing.assert_close(y, theirs(ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(y, make_model(0)(ids), rtol=0, atol=1e-5)  # starts as the base
    loss_fn(ours, ids).backward()
    loss_fn(theirs, ids).backward()
    for name, layer in layers.items():
        peft_mod = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad, peft_mod.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, peft_mod.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_default_factors_follow_the_formula(seeded_svd_lowrank):
    """ArB2r + stable, rebuilt here: A0 = Vh[:r], B0 = U[:, r:2r] S[r:2r] out^(1/4) / sqrt(16)."""
    model = make_model(0)
    grads = estimate_full_gradients(model, ["fc1"], BATCHES, loss_fn)
    inject_loraga(model, ["fc1"], grads, r=R, alpha=ALPHA)
    layer = model.layers[0].mlp.fc1
    g = grads["layers.0.mlp.fc1"]  # [32, 16]
    u, s, vh = torch.linalg.svd(g)  # exact SVD: equal to the randomised one up to sign, as q = 4r covers it
    sign_a = torch.sign((layer.lora_A0 * vh[:R]).sum(1))
    torch.testing.assert_close(layer.lora_A0 * sign_a[:, None], vh[:R], rtol=0, atol=1e-4)
    b_expected = u[:, R:2 * R] * s[R:2 * R] * (32 ** 0.25 / 16 ** 0.5)
    sign_b = torch.sign((layer.lora_B0 * b_expected).sum(0))
    torch.testing.assert_close(layer.lora_B0 * sign_b, b_expected, rtol=0, atol=1e-4 * s[0].item())


# ------------------------------------------------------------------ what it is for: the first step
def first_sgd_step(model, batch, lr):
    """{name: change of each adapted layer's effective weight} after one SGD step on `batch`."""
    layers = adapter_modules(model)
    before = {n: m.merged_weight().detach().clone() for n, m in layers.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(lm_loss(model, batch), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
    return {n: m.merged_weight().detach() - before[n] for n, m in layers.items()}


def cosine(dw, ref):
    a = torch.cat([dw[n].flatten() for n in sorted(ref)])
    b = torch.cat([ref[n].flatten() for n in sorted(ref)])
    return (a @ b / (a.norm() * b.norm())).item()


def test_first_step_is_closer_to_full_fine_tuning_than_loras():
    """TinyLlama (random init, seed 0), gradient from 4 batches, the step on a 5th. Measured:
    cosine 0.68 for LoRA-GA, 0.24 for LoRA (r=4, alpha=16, SGD lr=1e-3)."""
    torch.manual_seed(0)
    base = TinyLlama(TinyConfig())
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    grads = estimate_full_gradients(base, targets, make_batches(FINETUNE, 4, seed=0, batch_size=16), lm_loss)
    step = make_batches(FINETUNE, 1, seed=1, batch_size=16)[0]
    full = {n: -1e-3 * g for n, g in estimate_full_gradients(base, targets, [step], lm_loss).items()}
    torch.manual_seed(0)
    loraga = inject_loraga(copy.deepcopy(base), targets, grads, r=4, alpha=16)
    lora = inject_lora(copy.deepcopy(base), targets, r=4, alpha=16)
    cos_ga, cos_lora = cosine(first_sgd_step(loraga, step, 1e-3), full), cosine(first_sgd_step(lora, step, 1e-3), full)
    assert cos_ga > 0.6 and cos_lora < 0.35, (cos_ga, cos_lora)


def test_first_step_follows_the_hand_formula():
    """dW = s (dB A0 + B0 dA) + s dB dA = -lr s^2 (G A0^T A0 + B0 B0^T G) + O(lr^2)."""
    model = make_model(0)
    grads = estimate_full_gradients(model, TARGETS, BATCHES, loss_fn)
    inject_loraga(model, TARGETS, grads, r=R, alpha=ALPHA)
    step = token_ids(seed=20, batch=4, seq=6)
    g_step = estimate_full_gradients(make_model(0), TARGETS, [step], loss_fn)
    lr = 1e-4
    layers = adapter_modules(model)
    before = {n: m.merged_weight().detach().clone() for n, m in layers.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    for p, g in zip(params, torch.autograd.grad(loss_fn(model, step), params)):
        p.data -= lr * g
    for name, layer in layers.items():
        a0, b0, s, g = layer.lora_A0, layer.lora_B0, layer.scaling, g_step[name]
        expected = -lr * s ** 2 * (g @ a0.T @ a0 + b0 @ b0.T @ g)
        got = layer.merged_weight().detach() - before[name]
        assert (got - expected).norm() < 1e-2 * expected.norm(), name


# ------------------------------------------------------------------ files and conversion
def test_file_round_trips_bit_exactly_and_converts_to_lora(tmp_path):
    model = make_model(0)
    grads = estimate_full_gradients(model, TARGETS, BATCHES, loss_fn)
    inject_loraga(model, TARGETS, grads, r=R, alpha=ALPHA, direction="A2rBr", scale="gd_scale")
    randomise_adapters_(model)
    save_adapter(model, tmp_path / "loraga.safetensors")
    back = load_adapter(make_model(0), tmp_path / "loraga.safetensors")  # no gradient needed to load
    assert all(type(m) is LoRAGALinear and m.direction == "A2rBr" for m in adapter_modules(back).values())
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    converted = convert_to_lora(back, make_model(0))
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), model(ids), rtol=0, atol=1e-5)
        assert not torch.allclose(model(ids), make_model(0)(ids), atol=1e-3)


# ------------------------------------------------------------------ bad input: an error, nothing changed
@pytest.mark.parametrize("kwargs, match", [
    ({"r": 5}, r"needs 2r <= min\(out, in\), so r <= 4"),  # v_proj is [8, 16]
    ({"direction": "BrAr"}, "direction must be one of"), ({"scale": "big"}, "scale must be one of"),
    ({"stable_gamma": 0}, "stable_gamma"), ({"stable_gamma": True}, "stable_gamma"),
    ({"r": 2.0}, "r must be a positive int"), ({"alpha": 0}, "alpha"),
    ({"target_modules": ["fc2"]}, r"no gradient for \['layers.0.mlp.fc2'"),
    ({"gradients": "bad shape"}, r"shape \(16, 16\)"), ({"gradients": "nan"}, "inf or NaN"),
])
def test_bad_injection_raises_and_changes_nothing(kwargs, match):
    model = make_model(0)
    grads = estimate_full_gradients(model, TARGETS, BATCHES[:1], loss_fn)
    if kwargs.get("gradients") == "bad shape":
        grads["layers.1.attn.q_proj"] = grads["layers.1.attn.q_proj"].T[:, :8]
    elif kwargs.get("gradients") == "nan":
        grads["layers.1.attn.q_proj"][0, 0] = float("nan")
    kwargs = {"target_modules": TARGETS, "r": R, **{k: v for k, v in kwargs.items() if k != "gradients"}}
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        inject_loraga(model, gradients=grads, **kwargs)
    assert_unchanged(model, before)


def test_a_model_with_adapters_is_refused():
    model = inject_lora(make_model(0), ["q_proj"], r=R)
    before = snapshot(model)
    with pytest.raises(ValueError, match="call inject_loraga once"):
        inject_loraga(model, ["v_proj"], {})
    assert_unchanged(model, before)
