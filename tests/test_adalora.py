"""AdaLoRA (lora_edu.methods.adalora, adalora_budget) against HF PEFT's AdaLoraConfig / AdaLoraModel.

Both sides get the same weights (ours copied into PEFT's lora_B = P, lora_E = lam, lora_A = Q)
and, for the allocator, the same gradients set by hand each step, so any difference is one of
arithmetic: the forward, gradients and merged weight to a relative 1e-5 (PEFT scales by
alpha / (init_r + 1e-5), ours by alpha / init_r: a relative 1e-5 / init_r apart), the penalty to 1e-6, the importance EMAs, lam and the masks exactly (the same
float32 operations on the same numbers).
"""

import copy
import types

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")  # the import takes a few seconds; once per module
from peft import AdaLoraConfig, get_peft_model  # noqa: E402
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator  # noqa: E402

from _models import OneLayer, assert_unchanged, make_model, snapshot, token_ids  # noqa: E402
from lora_edu import count_trainable_params, load_adapter, read_adapter, save_adapter  # noqa: E402
from lora_edu.methods.adalora import AdaLoRALinear, inject_adalora, orthogonal_penalty  # noqa: E402
from lora_edu.methods.adalora_budget import adalora_layers, budget_schedule, rank_pattern  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tensors of a few hundred numbers: a second thread costs more than the op, and on a busy
    2-core machine 10 to 100 times more (12 training steps of the tiny LLaMA: 12 s, on one: 0.2 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IN, OUT, R, ALPHA = 20, 24, 4, 8.0
TARGETS = ["q_proj", "v_proj", "fc1"]  # in _models.TinyModel: [16, 16], [8, 16], [32, 16], two of each
PEFT_NAMES = {"P": "lora_B", "lam": "lora_E", "Q": "lora_A"}


def peft_config(**kw):
    base = dict(init_r=R, target_r=2, lora_alpha=ALPHA, target_modules=TARGETS, total_step=10)
    return AdaLoraConfig(**{**base, **kw})


def peft_tensor(peft_layer, t):
    return getattr(peft_layer, PEFT_NAMES[t])["default"]


def copy_into_peft_(ours_model, peft_inner):
    """Every AdaLoRA layer's P, lam, Q copied into PEFT's layer of the same name."""
    with torch.no_grad():
        for name, layer in adalora_layers(ours_model).items():
            theirs = peft_inner.get_submodule(name)
            for t in ("P", "Q"):
                peft_tensor(theirs, t).copy_(getattr(layer, t))
            peft_tensor(theirs, "lam").copy_(layer.lam[:, None])  # PEFT's lora_E is [r, 1]


def randomise_(model, seed=7):
    """P, Q as after training (not orthonormal) and lam != 0, so every term of dW and R is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adalora_layers(model).values():
            for t in ("P", "lam", "Q"):
                w = getattr(layer, t)
                w.copy_(torch.randn(w.shape, generator=g) * (0.3 if t != "lam" else 1.0))


def models_pair(**kw):
    """(ours, allocator, peft_model) on copies of one TinyModel, with the same random adapters."""
    base = make_model()
    cfg = dict(init_r=R, target_r=2, alpha=ALPHA, total_step=10)
    ours, allocator = inject_adalora(copy.deepcopy(base), TARGETS, **{**cfg, **kw})
    randomise_(ours)
    peft_kw = {"lora_alpha" if k == "alpha" else k: v for k, v in {**cfg, **kw}.items()}
    theirs = get_peft_model(copy.deepcopy(base), peft_config(**peft_kw))
    copy_into_peft_(ours, theirs.base_model.model)
    return ours, allocator, theirs


# ------------------------------------------------------------------ the layer
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["eval", "dropout"])
def test_layer_forward_gradients_and_merge_equal_peft(bias, dropout):
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=bias)
    ours = AdaLoRALinear(copy.deepcopy(linear), init_r=R, alpha=ALPHA, dropout=dropout)
    theirs = get_peft_model(OneLayer(copy.deepcopy(linear)),
                            peft_config(target_modules=["proj"], lora_dropout=dropout))
    layer = theirs.base_model.model.proj
    assert [tuple(getattr(ours, t).shape) for t in ("P", "lam", "Q")] == [(OUT, R), (R,), (R, IN)]
    assert [tuple(peft_tensor(layer, t).shape) for t in ("P", "lam", "Q")] == [(OUT, R), (R, 1), (R, IN)]
    x0 = torch.randn(6, IN)
    assert torch.equal(ours(x0), linear(x0)) and torch.equal(theirs(x0), linear(x0))  # lam = 0: dW = 0
    randomise_(OneLayer(ours))
    copy_into_peft_(OneLayer(ours), theirs.base_model.model)
    ours.train(), theirs.train()
    results = []
    for model in (OneLayer(ours), theirs):
        x = torch.randn(6, IN, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        torch.manual_seed(3)  # the same dropout mask on both sides
        y = model(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        results.append((y, x.grad))
    (y_ours, dx_ours), (y_peft, dx_peft) = results
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_ours, linear(x.detach()), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(dx_ours, dx_peft, rtol=1e-5, atol=1e-5)
    for t in ("P", "lam", "Q"):
        want = peft_tensor(layer, t).grad.view(getattr(ours, t).shape)
        assert torch.count_nonzero(want) > 0
        torch.testing.assert_close(getattr(ours, t).grad, want, rtol=1e-5, atol=1e-6)
    merged = theirs.merge_and_unload().proj.weight
    ours.merge()
    torch.testing.assert_close(ours.base.weight, merged, rtol=1e-5, atol=1e-6)


def test_init_and_trainable_count_match_peft():
    ours, _, theirs = models_pair()
    fresh, _ = inject_adalora(make_model(), TARGETS, init_r=R, target_r=2, total_step=10)
    for layer in adalora_layers(fresh).values():
        assert torch.equal(layer.lam, torch.zeros(R)) and torch.equal(layer.lam_mask, torch.ones(R))
    # PEFT draws P, Q from N(0, 0.02^2); 16 * 4 numbers per matrix or more: a loose band on the std
    stds = torch.stack([getattr(layer, t).std() for layer in adalora_layers(fresh).values() for t in ("P", "Q")])
    assert ((stds > 0.015) & (stds < 0.025)).all(), stds
    peft_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    shapes = [tuple(m.base.weight.shape) for m in adalora_layers(ours).values()]
    assert count_trainable_params(ours) == peft_trainable == sum(R * (d + k) + R for d, k in shapes)
    ids = token_ids(vocab=11)
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-5, atol=1e-5)


def test_merge_then_unmerge_is_the_identity_and_keeps_the_output():
    from lora_edu import merge_lora, unmerge_lora

    model, _ = inject_adalora(make_model(), TARGETS, init_r=R, target_r=2, total_step=10)
    randomise_(model)
    ids = token_ids()
    weights = {n: m.base.weight.clone() for n, m in adalora_layers(model).items()}
    before = model(ids)
    merge_lora(model)
    assert all(not torch.allclose(m.base.weight, weights[n]) for n, m in adalora_layers(model).items())
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for name, layer in adalora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, weights[name], rtol=0, atol=1e-6)
    assert torch.allclose(model(ids), before, atol=1e-5)


# ------------------------------------------------------------------ the orthogonality penalty
class WithLoss(nn.Module):
    """Returns an object with a .loss, which is what makes AdaLoraModel.forward add its penalty."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return types.SimpleNamespace(loss=torch.zeros(()))


def test_orthogonal_penalty_equals_peft_value_and_gradient():
    ours, _, _ = models_pair()
    theirs = get_peft_model(WithLoss(make_model()), peft_config(orth_reg_weight=0.3))
    copy_into_peft_(ours, theirs.base_model.model.inner)
    want = theirs.base_model(token_ids()).loss  # AdaLoraModel.forward: 0 + orth_reg_weight * R
    got = orthogonal_penalty(ours, weight=0.3)
    assert want.item() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    got.backward(), want.backward()
    for name, layer in adalora_layers(ours).items():
        for t in ("P", "Q"):
            torch.testing.assert_close(getattr(layer, t).grad,
                                       peft_tensor(theirs.base_model.model.inner.get_submodule(name), t).grad,
                                       rtol=1e-5, atol=1e-7)
        assert layer.lam.grad is None  # the penalty does not touch the singular values


def test_orthogonal_penalty_by_hand():
    """Orthonormal P and Q give 0; P = 2 U (U orthonormal) gives ||3 I||_F = 3 sqrt(r) for that matrix."""
    model, _ = inject_adalora(make_model(), ["q_proj"], init_r=R, target_r=2, total_step=10)
    layers = list(adalora_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.P.copy_(torch.linalg.qr(torch.randn(16, R))[0])  # [16, r], orthonormal columns
            layer.Q.copy_(torch.linalg.qr(torch.randn(16, R))[0].T)  # [r, 16], orthonormal rows
    assert orthogonal_penalty(model).item() < 1e-5
    with torch.no_grad():
        layers[0].P.mul_(2)
    # 4 matrices, one of them off by 3 I: mean 3 sqrt(r) / 4, times PEFT's default weight 0.5
    torch.testing.assert_close(orthogonal_penalty(model).item(), 0.5 * 3 * R ** 0.5 / 4, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ the budget schedule
@pytest.mark.parametrize("init_r, target_r, total_step, tinit, tfinal", [
    (12, 8, 20, 3, 5), (6, 1, 13, 0, 0), (4, 2, 50, 10, 10), (12, 4, 37, 1, 30)])
def test_budget_schedule_equals_peft_at_every_step(init_r, target_r, total_step, tinit, tfinal):
    n = 7
    theirs = PeftRankAllocator.__new__(PeftRankAllocator)  # only its schedule: no model needed
    theirs.peft_config = types.SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=1)
    theirs.init_bgt, theirs.target_bgt = init_r * n, target_r * n
    ours = [budget_schedule(t, init_r * n, target_r * n, total_step, tinit, tfinal) for t in range(total_step + 3)]
    assert ours == [theirs.budget_schedule(t)[0] for t in range(total_step + 3)]
    final = total_step - tfinal
    assert ours[tinit] == init_r * n and ours[final] == target_r * n  # the two ends, by hand
    assert all(a >= b for a, b in zip(ours, ours[1:]))  # it only shrinks
    mid = tinit + (final - tinit) // 2
    left = 1 - (mid - tinit) / (final - tinit)
    assert ours[mid] == int(target_r * n + (init_r - target_r) * n * left ** 3)


# ------------------------------------------------------------------ importance, masks, the final phase
def test_importance_masks_and_final_phase_equal_peft_step_by_step():
    """total_step 12, tinit 2, tfinal 4, deltaT 2: allocations at 4 and 6, the last at 8, fixed after."""
    sched = dict(total_step=12, tinit=2, tfinal=4, deltaT=2, beta1=0.8, beta2=0.7)
    ours, allocator, theirs = models_pair(**sched)
    inner = theirs.base_model.model
    g = torch.Generator().manual_seed(5)
    layers = adalora_layers(ours)
    masks, regrown = {}, 0
    for step in range(1, 15):
        with torch.no_grad():  # the same gradient and the same "optimizer step" on both sides
            for name, layer in layers.items():
                for t in ("P", "lam", "Q"):
                    w, w_peft = getattr(layer, t), peft_tensor(inner.get_submodule(name), t)
                    grad = torch.randn(w.shape, generator=g)
                    # at the last allocation PEFT does not update the EMAs: a gradient 100x the others
                    # there would reorder the scores if it were used
                    big = grad * (100.0 if step == 8 else 1.0)
                    w.grad, w_peft.grad = big.clone(), big.view(w_peft.shape).clone()
                    w.sub_(0.05 * grad), w_peft.sub_(0.05 * grad.view(w_peft.shape))
                regrown += int(torch.count_nonzero(layer.lam[layer.lam_mask == 0]))
        budget = allocator.step(ours, step)
        theirs.base_model.update_and_allocate(step)
        assert budget == theirs.base_model.rankallocator.budget_schedule(step)[0]
        if step < 8:  # the EMAs PEFT keeps (reset after the last allocation, as ours are)
            for (name, t), sens in allocator.sensitivity.items():
                key = f"{name}.{PEFT_NAMES[t]}.default"
                assert torch.equal(sens.view(-1), theirs.base_model.rankallocator.exp_avg_ipt[key].view(-1))
                assert torch.equal(allocator.uncertainty[name, t].view(-1),
                                   theirs.base_model.rankallocator.exp_avg_unc[key].view(-1))
        if step in (4, 6):  # the scores PEFT pruned by, from its own EMAs, by the paper's formula
            for name, score in allocator.triplet_scores().items():
                s = {t: theirs.base_model.rankallocator._element_score(f"{name}.{PEFT_NAMES[t]}.default")
                     for t in ("P", "lam", "Q")}
                want = s["lam"].view(-1) + s["Q"].mean(dim=1) + s["P"].mean(dim=0)
                torch.testing.assert_close(score, want, rtol=1e-6, atol=0)
        for name, layer in layers.items():
            assert torch.equal(layer.lam, peft_tensor(inner.get_submodule(name), "lam").view(-1)), (step, name)
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern is not None:
            for name, layer in layers.items():
                assert layer.lam_mask.bool().tolist() == pattern[f"{name}.lora_E.default"], (step, name)
        masks[step] = {name: layer.lam_mask.clone() for name, layer in layers.items()}
    kept = {step: sum(int(m.sum()) for m in masks[step].values()) for step in masks}
    assert kept[3] == 24 and kept[4] == allocator.budget(4) < 24 and kept[6] == allocator.budget(6)
    assert kept[8] == 12 == allocator.target_budget  # 6 layers, target_r 2
    assert rank_pattern(ours) == {name: int(m.sum()) for name, m in masks[14].items()}
    assert len(set(rank_pattern(ours).values())) > 1  # the budget is global: layers keep different ranks
    for step in range(9, 15):  # fixed: the same mask, and lam re-zeroed where the optimizer regrew it
        assert all(torch.equal(masks[step][n], masks[8][n]) for n in layers)
    for layer in layers.values():
        assert torch.count_nonzero(layer.lam[layer.lam_mask == 0]) == 0
    assert regrown > 0  # the "optimizer" did regrow pruned lam, so the re-zeroing was tested


def test_step_needs_gradients_and_its_own_model():
    model, allocator = inject_adalora(make_model(), TARGETS, init_r=R, target_r=2, total_step=10)
    with pytest.raises(RuntimeError, match="no gradient.*after backward"):
        allocator.step(model, 1)
    other, _ = inject_adalora(make_model(), ["q_proj"], init_r=R, target_r=2, total_step=10)
    with pytest.raises(ValueError, match="built for the AdaLoRA layers"):
        allocator.step(other, 1)


# ------------------------------------------------------------------ bad input
GOOD = dict(init_r=R, target_r=2, total_step=10)


@pytest.mark.parametrize("change, error, match", [
    (dict(target_r=5), ValueError, "target_r=5 > init_r=4"),
    (dict(target_r=0), ValueError, "target_r must be an int >= 1"),
    (dict(tinit=5, tfinal=5), ValueError, r"tinit \+ tfinal = 5 \+ 5 >= total_step=10"),
    (dict(tinit=-1), ValueError, "tinit must be an int >= 0"),
    (dict(tfinal=1.5), ValueError, "tfinal must be an int"),
    (dict(beta1=1.0), ValueError, r"beta1 must be in \[0, 1\)"),
    (dict(beta2=-0.1), ValueError, r"beta2 must be in \[0, 1\)"),
    (dict(deltaT=0), ValueError, "deltaT must be an int >= 1"),
    (dict(total_step=None), ValueError, "total_step is required"),
    (dict(total_step=0), ValueError, "total_step must be an int >= 1"),
    (dict(init_r=0), ValueError, "init_r must be a positive int"),
    (dict(init_r=True), ValueError, "init_r must be a positive int"),
    (dict(init_r=9, target_r=2), ValueError, r"init_r=9 > min\(out, in\) = 8 for 'layers.0.attn.v_proj'"),
    (dict(alpha=0), ValueError, "alpha must be a positive"),
    (dict(dropout=1.0), ValueError, r"dropout must be a probability in \[0, 1\)"),
])
def test_bad_hyperparameters_raise_before_anything_changes(change, error, match):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        inject_adalora(model, TARGETS, **{**GOOD, **change})
    assert_unchanged(model, before)


def test_bad_targets_layers_and_weights_raise():
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] matched no nn.Linear"):
        inject_adalora(model, ["nope"], **GOOD)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="AdaLoRALinear wraps an nn.Linear, got Conv1d"):
        AdaLoRALinear(nn.Conv1d(4, 4, 1))
    inject_adalora(model, TARGETS, **GOOD)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has adapter layers; call inject_adalora once"):
        inject_adalora(model, TARGETS, **GOOD)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        orthogonal_penalty(model, weight=-1.0)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="no AdaLoRA layers; call inject_adalora"):
        orthogonal_penalty(make_model())


# ------------------------------------------------------------------ adapter files
def test_adapter_file_round_trips_bit_exactly_with_the_mask(tmp_path):
    model, allocator = inject_adalora(make_model(), TARGETS, init_r=R, target_r=2, total_step=10)
    randomise_(model)
    with torch.no_grad():
        for layer in adalora_layers(model).values():
            for t in ("P", "lam", "Q"):
                getattr(layer, t).grad = torch.randn(getattr(layer, t).shape)
    allocator.step(model, 1)  # tinit = 0, deltaT = 1: step 1 prunes to b(1) < b0
    pattern = rank_pattern(model)
    assert sum(pattern.values()) == allocator.budget(1) < allocator.init_budget
    path = tmp_path / "adalora.safetensors"
    save_adapter(model, path)
    config, tensors = read_adapter(path)
    assert config["method"] == "adalora" and config["init_r"] == R
    # the file holds the layers' tensors and the mask, not the allocator's EMAs (training state)
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"P", "lam", "Q", "lam_mask"}
    loaded = load_adapter(make_model(), path)
    assert rank_pattern(loaded) == pattern
    for name, layer in adalora_layers(model).items():
        twin = loaded.get_submodule(name)
        assert isinstance(twin, AdaLoRALinear) and twin.scaling == layer.scaling
        for t, value in layer.adapter_tensors().items():
            assert torch.equal(getattr(twin, t), value), (name, t)
        assert torch.count_nonzero(twin.lam[twin.lam_mask == 0]) == 0  # masked lam stays masked
    ids = token_ids()
    assert torch.equal(loaded(ids), model(ids))


# ------------------------------------------------------------------ training with lora_edu.tiny
class NoStep:
    """An optimizer that keeps the weights: train's one step then leaves its gradients to read."""

    def __init__(self, params):
        self.params = list(params)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        pass


def tiny_adalora(**kw):
    from lora_edu.tiny import LLAMA_TARGETS, TinyConfig, TinyLlama

    torch.manual_seed(0)
    return inject_adalora(TinyLlama(TinyConfig(n_layer=1)), LLAMA_TARGETS, init_r=R, target_r=2, **kw)


def test_train_differentiates_the_penalty_but_returns_the_task_loss():
    from lora_edu.tiny import FINETUNE, lm_loss, make_batches, train

    model, _ = tiny_adalora(total_step=10)
    randomise_(model)
    batches = make_batches(FINETUNE, 1, 0, 8)  # [1, 8, T + 1]
    params = [p for p in model.parameters() if p.requires_grad]
    seen = {}
    regularizer = lambda m: orthogonal_penalty(m, weight=0.7)  # noqa: E731
    losses = train(model, batches, 1, optimizer=NoStep(params), progress=False, regularizer=regularizer,
                   callback=lambda step, m: seen.update({id(p): p.grad.clone() for p in params}))
    task = lm_loss(model, batches[0])
    penalty = regularizer(model)
    assert losses == [task.item()] and penalty.item() > 0.1  # the task loss alone, not loss + penalty
    expected = torch.autograd.grad(task + penalty, params)
    task_only = torch.autograd.grad(lm_loss(model, batches[0]), params)
    for p, want, without in zip(params, expected, task_only):
        torch.testing.assert_close(seen[id(p)], want, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(seen[id(p)], w, atol=1e-4) for p, w in zip(params, task_only))


def test_train_with_the_allocator_prunes_to_the_target_and_fixes_the_mask():
    from lora_edu.tiny import FINETUNE, train

    model, allocator = tiny_adalora(total_step=12, tinit=2, tfinal=4, deltaT=2)
    layers = adalora_layers(model)
    masks = {}

    def callback(step, m):
        allocator.callback(step, m)
        masks[step] = torch.cat([layer.lam_mask for layer in layers.values()])

    train(model, FINETUNE, 12, batch_size=4, progress=False, regularizer=orthogonal_penalty, callback=callback)
    assert masks[2].sum() == allocator.init_budget == 7 * R  # tinit: nothing pruned yet
    assert masks[8].sum() == allocator.target_budget == 7 * 2
    assert all(torch.equal(masks[s], masks[8]) for s in range(9, 13))
    assert sum(rank_pattern(model).values()) == 14
    for layer in layers.values():
        assert torch.count_nonzero(layer.lam[layer.lam_mask == 0]) == 0
        assert torch.count_nonzero(layer.lam[layer.lam_mask == 1]) == int(layer.lam_mask.sum())
