"""lora_edu.methods.pissa (and the shift in shifted.py): PiSSALinear against HF PEFT's init_lora_weights="pissa".

Both sides wrap copies of one nn.Linear. Singular vectors are defined up to sign, so the
factors are compared after aligning each triplet's sign, and the sign-free quantities (B @ A,
the residual, the singular values) directly. The randomised SVD ("pissa_niter_K") draws from
torch's global RNG, which PEFT also spends on its own default init first; the tests make the
draws the same on both sides by reseeding inside torch.svd_lowrank, so that case is compared
exactly too. Also: the wrapped model starts as the base, the residual keeps W0's spectral
tail, adapter files round-trip bit for bit into the original model, conversion to a rank-2r
LoRA equals PEFT's, and every bad input raises and changes nothing.
"""

import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")  # a few seconds to import; once per module
import peft.tuners.lora.layer as peft_layer  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from _models import OneLayer, assert_unchanged, make_model, randomise_adapters_, snapshot, token_ids  # noqa: E402
from lora_edu import LoRALinear, NF4Linear, adapter_modules, inject_lora, load_adapter, save_adapter  # noqa: E402
from lora_edu.methods.pissa import PiSSALinear, inject_pissa, pissa_factors  # noqa: E402
from lora_edu.methods.shifted import convert_to_lora  # noqa: E402

IN, OUT, R, ALPHA = 40, 24, 4, 8  # non-square: a transposed factor could not broadcast
TARGETS = ["q_proj", "v_proj", "fc1"]
pytestmark = pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")  # PEFT's advice to convert


def linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def peft_layer_for(lin, init="pissa", rslora=False, r=R, alpha=ALPHA):
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=init, use_rslora=rslora)
    model = get_peft_model(OneLayer(copy.deepcopy(lin)), config)
    return model, model.base_model.model.proj


def factors(layer):
    """(A, B, residual) of a PEFT layer."""
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight


def assert_equal_up_to_sign(ours_a, ours_b, a, b, atol=1e-5):
    """Each triplet i may flip: A[i] -> -A[i] together with B[:, i] -> -B[:, i]."""
    sign = torch.sign((ours_a * a).sum(dim=1))  # [r]
    assert (sign != 0).all()
    torch.testing.assert_close(ours_a * sign[:, None], a, rtol=0, atol=atol)
    torch.testing.assert_close(ours_b * sign, b, rtol=0, atol=atol)
    return sign


def inputs(seed=1, n=6):
    return torch.randn(n, IN, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def seeded_svd_lowrank(monkeypatch):
    """torch.svd_lowrank, reseeded before each call on both sides: the same random draws."""
    original = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(1234)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)  # PEFT's PiSSA imported the name itself


# ------------------------------------------------------------------ the init against PEFT
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_exact_svd_init_equals_peft(rslora, bias):
    lin = linear(bias=bias)
    theirs, layer = peft_layer_for(lin, rslora=rslora)
    ours = PiSSALinear(copy.deepcopy(lin), r=R, alpha=ALPHA, rslora=rslora)
    a, b, residual = factors(layer)
    assert ours.scaling == layer.scaling["default"]
    sign = assert_equal_up_to_sign(ours.lora_A, ours.lora_B, a, b)
    torch.testing.assert_close(ours.scaling * ours.lora_B @ ours.lora_A, layer.scaling["default"] * b @ a,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.base.weight, residual, rtol=0, atol=1e-6)
    # the singular values: s * ||B[:, i]|| * ||A[i]|| is W0's i-th, on both sides
    s_vals = torch.linalg.svdvals(lin.weight.detach())[:R]
    for aa, bb in ((ours.lora_A, ours.lora_B), (a, b)):
        torch.testing.assert_close(ours.scaling * bb.norm(dim=0) * aa.norm(dim=1), s_vals, rtol=1e-5, atol=0)
    # forward and gradients, with trained-looking B on both sides
    db = torch.randn(b.shape, generator=torch.Generator().manual_seed(5)) * 0.1
    with torch.no_grad():
        ours.lora_B.add_(db * sign)
        b.add_(db)
    x = inputs()
    y_ours, y_peft = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=0, atol=1e-5)
    (y_ours.square().sum()).backward()
    (y_peft.square().sum()).backward()
    torch.testing.assert_close(ours.lora_A.grad * sign[:, None], a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lora_B.grad * sign, b.grad, rtol=1e-5, atol=1e-5)
    ours.merge()
    torch.testing.assert_close(ours.base.weight, theirs.merge_and_unload().proj.weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("niter", [0, 2])
def test_randomised_svd_init_equals_peft_with_the_same_draws(seeded_svd_lowrank, niter):
    lin = linear()
    theirs, layer = peft_layer_for(lin, init=f"pissa_niter_{niter}")
    ours = PiSSALinear(copy.deepcopy(lin), r=R, alpha=ALPHA, niter=niter)
    a, b, residual = factors(layer)
    assert_equal_up_to_sign(ours.lora_A, ours.lora_B, a, b, atol=1e-6)
    torch.testing.assert_close(ours.base.weight, residual, rtol=0, atol=1e-6)
    x = inputs()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_randomised_svd_finds_the_principal_part_of_a_decaying_spectrum():
    """Without matched draws: on W0 with singular values 2^-k, niter=4 takes the top r to 1e-4."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(OUT, OUT, generator=g))[0]
    v = torch.linalg.qr(torch.randn(IN, OUT, generator=g))[0]
    s_vals = 2.0 ** -torch.arange(OUT, dtype=torch.float32)  # [out]
    lin = nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight.copy_(u * s_vals @ v.T)
    torch.manual_seed(0)
    layer = PiSSALinear(lin, r=R, alpha=ALPHA, niter=4)
    taken = torch.linalg.svdvals(layer.initial_delta())[:R]
    kept = torch.linalg.svdvals(layer.base.weight)
    torch.testing.assert_close(taken, s_vals[:R], rtol=1e-4, atol=0)
    torch.testing.assert_close(kept[:4], s_vals[R:R + 4], rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------ the layer's own invariants
def test_the_residual_keeps_w0s_tail_and_the_adapter_its_top():
    lin = linear()
    w0 = lin.weight.detach().clone()
    layer = PiSSALinear(lin, r=R, alpha=ALPHA)
    s_vals = torch.linalg.svdvals(w0)
    torch.testing.assert_close(torch.linalg.svdvals(layer.base.weight)[:OUT - R], s_vals[R:], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(layer.initial_delta())[:R], s_vals[:R], rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.original_weight(), w0, rtol=0, atol=1e-6)
    assert torch.equal(layer.lora_A0, layer.lora_A) and torch.equal(layer.lora_B0, layer.lora_B)
    # s * ||A0[i]|| ||B0[:, i]|| = S_i, split evenly: ||A0[i]|| = ||B0[:, i]|| = sqrt(S_i / s)
    torch.testing.assert_close(layer.lora_A0.norm(dim=1), (s_vals[:R] / layer.scaling).sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.lora_B0.norm(dim=0), (s_vals[:R] / layer.scaling).sqrt(), rtol=1e-5, atol=0)


def test_a_model_starts_as_the_base_and_trains_only_a_and_b():
    base = make_model()
    model = inject_pissa(make_model(), TARGETS, r=R)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=1e-5)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    layers = adapter_modules(model)
    assert sorted(layers) == sorted(n for n, m in base.named_modules() if n.split(".")[-1] in TARGETS)
    assert all(type(m) is PiSSALinear and m.scaling == 1.0 for m in layers.values())  # alpha=None: alpha = r
    buffers = {n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()}
    assert {"lora_A0", "lora_B0"} <= buffers


def test_merge_and_unmerge_after_training():
    layer = PiSSALinear(linear(), r=R, alpha=ALPHA)
    randomise_adapters_(OneLayer(layer))
    x = inputs()
    with torch.no_grad():
        y = layer(x)
        expected = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A  # residual + s B A
        layer.merge()
        torch.testing.assert_close(layer.base.weight, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, expected - layer.scaling * layer.lora_B @ layer.lora_A,
                                   rtol=0, atol=1e-6)


# ------------------------------------------------------------------ adapter files
def trained_pissa(seed=0, **kw):
    model = inject_pissa(make_model(seed), TARGETS, r=R, alpha=ALPHA, **kw)
    randomise_adapters_(model)
    return model


def test_file_round_trips_bit_exactly_into_the_original_model(tmp_path):
    model = trained_pissa()
    save_adapter(model, tmp_path / "pissa.safetensors")
    back = load_adapter(make_model(0), tmp_path / "pissa.safetensors")
    assert all(type(m) is PiSSALinear for m in adapter_modules(back).values())
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k  # the residual too: rebuilt from A0, B0 bit for bit
    # loading the same file again (same A0, B0) leaves every tensor as it is
    load_adapter(back, tmp_path / "pissa.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_loading_another_init_undoes_the_old_shift(tmp_path, seeded_svd_lowrank):
    """A file from a randomised-SVD init into a model injected with the exact SVD: the base is
    rebuilt as W0 - s B0' A0' from the file's A0', B0', not shifted twice."""
    other = trained_pissa(niter=0)  # niter=0 and the seeded draws: A0 far from the exact SVD's
    save_adapter(other, tmp_path / "other.safetensors")
    model = inject_pissa(make_model(0), TARGETS, r=R, alpha=ALPHA)
    name = "layers.0.attn.q_proj"
    assert not torch.allclose(model.get_submodule(name).lora_A0, other.get_submodule(name).lora_A0, atol=1e-2)
    load_adapter(model, tmp_path / "other.safetensors")
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), other(ids), rtol=0, atol=1e-5)
        for n, layer in adapter_modules(model).items():
            torch.testing.assert_close(layer.base.weight, other.get_submodule(n).base.weight, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ conversion to plain LoRA
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_conversion_equals_peft_path_initial_model_for_weight_conversion(tmp_path, rslora):
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="pissa", use_rslora=rslora)
    theirs = get_peft_model(make_model(0), config)
    theirs.save_pretrained(tmp_path / "init")
    ours = inject_pissa(make_model(0), TARGETS, r=R, alpha=ALPHA, rslora=rslora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the same "training" on both sides (after aligning each triplet's sign)
        for name, layer in adapter_modules(ours).items():
            peft_mod = theirs.base_model.model.get_submodule(name)
            a, b, _ = factors(peft_mod)
            sign = assert_equal_up_to_sign(layer.lora_A, layer.lora_B, a, b)
            da, db = torch.randn(a.shape, generator=g) * 0.1, torch.randn(b.shape, generator=g) * 0.1
            a.add_(da), b.add_(db)
            layer.lora_A.add_(da * sign[:, None]), layer.lora_B.add_(db * sign)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft_config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    peft_tensors = load_file(tmp_path / "converted" / "adapter_model.safetensors")

    converted = convert_to_lora(ours, make_model(0))
    layers = adapter_modules(converted)
    assert all(type(m) is LoRALinear and m.r == 2 * R for m in layers.values())
    assert peft_config["r"] == 2 * R
    assert all(m.alpha == pytest.approx(peft_config["lora_alpha"], rel=1e-12) for m in layers.values())
    for name, layer in layers.items():
        a = peft_tensors[f"base_model.model.{name}.lora_A.weight"]  # [2r, in]
        b = peft_tensors[f"base_model.model.{name}.lora_B.weight"]  # [out, 2r]
        s = ours.get_submodule(name).scaling
        torch.testing.assert_close(layer.delta_weight(), s * b @ a, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.base.weight, make_model(0).get_submodule(name).weight, rtol=0, atol=0)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), ours(ids), rtol=0, atol=1e-5)
        # PEFT's converted folder, read by lora_edu onto the original model, computes the same
        torch.testing.assert_close(load_adapter(make_model(0), tmp_path / "converted")(ids), converted(ids),
                                   rtol=0, atol=1e-5)
        # and ours, saved as a PEFT folder, loads in PEFT onto the original model
        save_adapter(converted, tmp_path / "ours", format="peft")
        torch.testing.assert_close(PeftModel.from_pretrained(make_model(0), tmp_path / "ours")(ids), ours(ids),
                                   rtol=0, atol=1e-5)
        assert not torch.allclose(ours(ids), make_model(0)(ids), atol=1e-3)  # the adapter matters


def test_conversion_without_the_original_rebuilds_w0():
    ours = trained_pissa()
    converted = convert_to_lora(ours)
    ids = token_ids()
    for name, layer in adapter_modules(converted).items():
        torch.testing.assert_close(layer.base.weight, make_model(0).get_submodule(name).weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), ours(ids), rtol=0, atol=1e-5)
    assert all(type(m) is PiSSALinear for m in adapter_modules(ours).values())  # ours is left as it was


# ------------------------------------------------------------------ bad input: an error, nothing changed
@pytest.mark.parametrize("kwargs, match", [
    ({"r": 17}, r"r <= 16"),  # q_proj is [16, 16]
    ({"niter": -1}, "niter"), ({"niter": 2.5}, "niter"), ({"niter": True}, "niter"), ({"niter": "4"}, "niter"),
    ({"r": 0}, "r must be"), ({"alpha": -1.0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": ["nope"]}, "matched no nn.Linear"),
])
def test_bad_injection_raises_and_changes_nothing(kwargs, match):
    model = make_model()
    before = snapshot(model)
    kwargs = {"target_modules": TARGETS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        inject_pissa(model, **kwargs)
    assert_unchanged(model, before)


def test_a_model_with_adapters_is_refused():
    model = inject_lora(make_model(), ["q_proj"], r=R)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has adapter layers; call inject_pissa once"):
        inject_pissa(model, ["v_proj"])
    assert_unchanged(model, before)


def test_unsupported_bases_are_refused_unchanged():
    lin = linear().double()
    before = snapshot(OneLayer(lin))
    with pytest.raises(TypeError, match=r"torch.float64.*model.float\(\)"):
        PiSSALinear(lin, r=R)
    assert_unchanged(OneLayer(lin), before)
    nf4 = NF4Linear.from_linear(linear(), block_size=8)
    with pytest.raises(TypeError, match="4-bit model, initialise on the float model"):
        PiSSALinear(nf4, r=R)
    bad = linear()
    with torch.no_grad():
        bad.weight[0, 0] = float("inf")  # not NaN: the snapshot compares with torch.equal
    before = snapshot(OneLayer(bad))
    with pytest.raises(ValueError, match="inf or NaN"):
        PiSSALinear(bad, r=R)
    assert_unchanged(OneLayer(bad), before)


def test_bf16_base_keeps_the_residual_in_bf16_and_starts_near_the_base():
    lin = linear().to(torch.bfloat16)
    w0 = lin.weight.detach().float().clone()
    layer = PiSSALinear(lin, r=R, alpha=ALPHA)
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    # the residual was rounded once to bf16 (unit roundoff 2^-8 of each entry)
    err = (layer.original_weight() - w0).abs()
    assert (err <= 2.0 ** -8 * layer.base.weight.float().abs() + 1e-30).all()


def test_bad_conversions_raise():
    ours = trained_pissa()
    with pytest.raises(ValueError, match="not the weight this adapter was initialised on"):
        convert_to_lora(ours, make_model(seed=1))
    with pytest.raises(ValueError, match="PiSSA or LoRA-GA layers"):
        convert_to_lora(inject_lora(make_model(), ["q_proj"], r=R))
    with pytest.raises(ValueError, match="before injection"):
        convert_to_lora(ours, ours)
    merged = trained_pissa()
    for layer in adapter_modules(merged).values():
        layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        convert_to_lora(merged)


def test_factors_are_float32_for_any_base_dtype():
    w = linear().weight.detach().to(torch.float16)
    a0, b0 = pissa_factors(w, R, 2.0)
    assert a0.dtype == b0.dtype == torch.float32 and a0.shape == (R, IN) and b0.shape == (OUT, R)
