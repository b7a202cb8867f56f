"""lora_edu.Adam and PagedAdam are bit-identical to torch.optim.Adam; PagedAdam keeps states away."""

import pytest
import torch
from torch import nn

from lora_edu import Adam, LoRALinear
from lora_edu.train.paged import PagedAdam


def _train(opt_cls, steps=25, **kw):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    params = [layer.lora_A, layer.lora_B]
    opt = opt_cls(params, **kw)
    x, y = torch.randn(32, 16), torch.randn(32, 12)
    for _ in range(steps):
        opt.zero_grad()
        (layer(x) - y).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("kw", [{}, {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6}])
@pytest.mark.parametrize("cls", [Adam, PagedAdam])
def test_bit_identical_to_torch_adam(kw, cls):
    ours, theirs = _train(cls, **kw), _train(torch.optim.Adam, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_it_trains():
    torch.manual_seed(0)
    w = nn.Parameter(torch.ones(3))
    opt = Adam([w], lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        w.square().sum().backward()
        opt.step()
    assert w.abs().max() < 0.05


def test_parameters_without_gradient_are_left_alone():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = Adam([a, b], lr=0.1)
    a.sum().backward()
    opt.step()
    assert not torch.equal(a, torch.ones(2)) and torch.equal(b, torch.ones(2))


@pytest.mark.parametrize("kw, match", [({"lr": 0}, "lr > 0"), ({"betas": (0.9, 1.0)}, "betas"),
                                       ({"eps": -1}, "eps")])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        Adam([nn.Parameter(torch.ones(1))], **kw)


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        Adam([])


def _paged_run(device):
    torch.manual_seed(0)
    big, small = nn.Parameter(torch.randn(64, 32, device=device)), nn.Parameter(torch.randn(8, device=device))
    opt = PagedAdam([big, small], lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        (big.square().sum() + small.sum()).backward()
        opt.step()
    return big, small, opt


def test_paged_states_wait_on_the_offload_device_and_come_in_one_at_a_time():
    big, small, opt = _paged_run("cpu")
    assert all(s.device.type == "cpu" for pair in opt.state.values() for s in pair)
    assert opt.state_bytes() == 2 * 4 * (big.numel() + small.numel())  # m and v, fp32
    assert opt.peak_resident_bytes == 2 * 4 * big.numel()  # the largest parameter's m and v only
    assert opt.bytes_paged_in == 3 * opt.state_bytes()  # every state, every step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_paged_on_gpu_matches_plain_adam_and_keeps_states_in_pinned_cpu_memory():
    big, small, opt = _paged_run("cuda")
    assert all(s.device.type == "cpu" and s.is_pinned() for pair in opt.state.values() for s in pair)
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(64, 32, device="cuda")), nn.Parameter(torch.randn(8, device="cuda"))]
    ref_opt = torch.optim.Adam(ref, lr=0.01, foreach=False)
    for _ in range(3):
        ref_opt.zero_grad()
        (ref[0].square().sum() + ref[1].sum()).backward()
        ref_opt.step()
    assert torch.equal(big, ref[0]) and torch.equal(small, ref[1])


def test_master_weights_step_in_float32_and_round_once():
    """A bf16 parameter with a master copy follows fp32 Adam on that copy; the bf16 weight is its rounding."""
    torch.manual_seed(0)
    w16 = nn.Parameter(torch.randn(8, 6).bfloat16())
    w32 = nn.Parameter(w16.detach().float())  # the same starting point in float32
    ours, reference = Adam([w16], lr=1e-2, master_weights=True), torch.optim.Adam([w32], lr=1e-2)
    x = torch.randn(5, 6)
    for _ in range(20):
        for w, opt in ((w16, ours), (w32, reference)):
            opt.zero_grad()
            (x.to(w.dtype) @ w.T).float().square().mean().backward()
        w32.grad = w16.grad.float()  # the reference sees the same (bf16) gradient, upcast
        ours.step()
        reference.step()
        assert torch.equal(ours.master[id(w16)], w32.detach())
        assert torch.equal(w16.detach(), w32.detach().bfloat16())
    m, v = ours.state[id(w16)]
    assert m.dtype == v.dtype == torch.float32  # 4 + 4 bytes of state per parameter, not 2 + 2


def test_without_master_weights_a_bf16_step_stays_in_bf16():
    w = nn.Parameter(torch.randn(4, 4).bfloat16())
    opt = Adam([w], lr=1e-2)
    w.grad = torch.ones_like(w)
    opt.step()
    assert opt.master == {} and all(s.dtype == torch.bfloat16 for s in opt.state[id(w)])


# --- parameter groups and decoupled weight decay (AdamW) ---

def _train_groups(opt_cls, groups_of, steps=6, schedule=False, **kw):
    """Three tensors in groups of their own lr and weight decay; returns them after `steps` steps."""
    torch.manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(*s)) for s in ((6, 5), (5,), (3, 6)))
    opt = opt_cls(groups_of(a, b, c), **kw)
    x = torch.randn(8, 5)
    for step in range(steps):
        opt.zero_grad()
        ((x @ a.T + b[:1]) @ c.T).square().mean().backward()
        opt.step()
        if schedule and step == 2:
            for group in opt.param_groups:
                group["lr"] *= 0.5  # a schedule edits the groups between steps, in both optimizers
    return [p.detach().clone() for p in (a, b, c)]


def _three_groups(a, b, c):
    return [{"params": [a], "lr": 0.02, "weight_decay": 0.1}, {"params": [b]},  # b: the defaults
            {"params": c, "lr": 0.005, "weight_decay": 0.0}]  # a bare tensor as "params", as torch allows


@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("cls", [Adam, PagedAdam])
def test_groups_bit_identical_to_torch_adamw(cls, schedule):
    kw = {"lr": 0.01, "betas": (0.8, 0.99)}
    ours = _train_groups(cls, _three_groups, schedule=schedule, **kw)
    theirs = _train_groups(torch.optim.AdamW, _three_groups, schedule=schedule, weight_decay=0.0, foreach=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(ours, theirs))
    plain = _train_groups(cls, lambda a, b, c: [a, b, c], **kw)
    assert not torch.equal(ours[0], plain[0])  # the groups' lr and decay did change something


def test_groups_without_decay_bit_identical_to_torch_adam():
    groups = lambda a, b, c: [{"params": [a, c], "lr": 0.03}, {"params": [b], "lr": 0.001}]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(_train_groups(Adam, groups), _train_groups(torch.optim.Adam, groups)))


def test_default_weight_decay_is_adamw_and_zero_is_adam():
    flat = lambda a, b, c: [a, b, c]  # noqa: E731
    ours = _train_groups(Adam, flat, weight_decay=0.3)
    assert all(torch.equal(x, y) for x, y in zip(ours, _train_groups(torch.optim.AdamW, flat, weight_decay=0.3)))
    coupled = _train_groups(torch.optim.Adam, flat, weight_decay=0.3)  # L2 in the gradient: not AdamW
    assert not torch.equal(ours[0], coupled[0])


def test_decoupled_decay_alone_shrinks_by_one_minus_lr_wd():
    """With a zero gradient Adam's update is 0, so only the decay acts: p * (1 - lr * wd) per step."""
    w = nn.Parameter(torch.full((3,), 2.0))
    opt = Adam([{"params": [w], "lr": 0.1, "weight_decay": 0.5}])
    for _ in range(3):
        w.grad = torch.zeros(3)
        opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 2.0 * 0.95 ** 3), rtol=1e-6, atol=0)


def test_master_weights_decay_the_float32_copy():
    torch.manual_seed(0)
    w16 = nn.Parameter(torch.randn(8, 6).bfloat16())
    w32 = nn.Parameter(w16.detach().float())
    ours = Adam([w16], lr=1e-2, weight_decay=0.2, master_weights=True)
    reference = torch.optim.AdamW([w32], lr=1e-2, weight_decay=0.2, foreach=False)
    for _ in range(5):
        w16.grad = torch.randn(8, 6).bfloat16()
        w32.grad = w16.grad.float()
        ours.step()
        reference.step()
    assert torch.equal(ours.master[id(w16)], w32.detach()) and torch.equal(w16.detach(), w32.detach().bfloat16())


def _p():
    return nn.Parameter(torch.ones(2))


_P, _Q = _p(), _p()


@pytest.mark.parametrize("params, kw, error, match", [
    ([{"params": [_P]}, {"params": [_Q, _P]}], {}, ValueError, "in group 0 as well"),
    ([_P, _P], {}, ValueError, "twice in that group"),
    ([{"params": [_P]}, {"params": []}], {}, ValueError, "group 1 is empty"),
    ([{"params": [_P], "lr": 0}], {}, ValueError, "lr > 0; parameter group 0"),
    ([{"params": [_P]}, {"params": [_Q], "lr": -1e-3}], {}, ValueError, "lr > 0; parameter group 1"),
    ([{"params": [_P], "weight_decay": -0.1}], {}, ValueError, "weight_decay >= 0"),
    ([_P], {"weight_decay": -0.1}, ValueError, "weight_decay >= 0"),
    ([{"params": [_P], "momentum": 0.9}], {}, ValueError, "keys .*'momentum'"),
    ([{"lr": 0.1}], {}, ValueError, "takes 'params'"),
    ([{"params": [_P]}, _Q], {}, TypeError, "mixing tensors and parameter-group dicts"),
    ([{"params": [_P, "w"]}], {}, TypeError, "holds a str"),
    (_P, {}, TypeError, "wrap it in a list"),
])
def test_bad_groups(params, kw, error, match):
    with pytest.raises(error, match=match):
        Adam(params, **kw)


def test_group_names_are_kept_and_missing_keys_take_the_defaults():
    opt = Adam([{"params": [_P], "name": "B", "lr": 0.5}, {"params": [_Q]}], lr=0.1, weight_decay=0.01)
    assert [(g.get("name"), g["lr"], g["weight_decay"]) for g in opt.param_groups] == [("B", 0.5, 0.01),
                                                                                     (None, 0.1, 0.01)]
