"""lora_edu.Adam is bit-identical to torch.optim.Adam."""

import pytest
import torch
from torch import nn

from lora_edu import Adam, LoRALinear


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
def test_bit_identical_to_torch_adam(kw):
    ours, theirs = _train(Adam, **kw), _train(torch.optim.Adam, **kw)
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
