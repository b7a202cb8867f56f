"""lora_edu.train.checkpointing.checkpoint against the same layer run without it.

Without checkpointing, a forward with dropout draws its masks from the global RNG once and the
backward draws nothing. A checkpoint must look the same from outside: its rebuilt forward
replays the first forward's masks (so the gradients are those of the plain run), and it must
leave the global RNG where the plain run leaves it, or the next step's dropout would draw
masks it has already used.
"""

import copy

import torch
from torch import nn

from lora_edu.memory.measure import saved_activations
from lora_edu.train.checkpointing import checkpoint


def _layers(seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.GELU(), nn.Linear(16, 8))
                         for _ in range(2)).train()


def _step(layers, x, checkpointed):
    """Two layers, a draw from the global RNG between forward and backward (as other code may make),
    then the backward; returns (the draw in between, a draw after the backward)."""
    for layer in layers:
        x = checkpoint(layer, x) if checkpointed else layer(x)
    between = torch.rand(4)
    x.square().sum().backward()
    return between, torch.rand(4)


def test_gradients_and_the_rng_after_backward_are_those_of_the_plain_run():
    plain, ckpt = _layers(), _layers()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    plain_draws = _step(plain, x.clone().requires_grad_(True), checkpointed=False)
    torch.manual_seed(7)
    ckpt_draws = _step(ckpt, x.clone().requires_grad_(True), checkpointed=True)
    # the rebuilt forwards replayed the first forwards' dropout masks: bit-identical gradients
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert q.grad is not None and torch.equal(p.grad, q.grad)
    # the RNG went on as in the plain run: neither rewound by the backward nor moved by it
    assert torch.equal(plain_draws[0], ckpt_draws[0])
    assert torch.equal(plain_draws[1], ckpt_draws[1])


def test_the_next_steps_masks_are_new():
    # The symptom of an RNG left rewound: with two checkpointed layers, the backward's last
    # replay (layer 1's) would leave the RNG just after layer 1's mask, so the next step's
    # layer 1 would draw the mask layer 2 had. Dropout on ones shows each mask itself; two
    # independent masks of 64 units coincide with probability 2^-64.
    drops = [nn.Dropout(0.5).train(), nn.Dropout(0.5).train()]
    torch.manual_seed(3)
    masks = []
    for _ in range(2):
        x = torch.ones(64, requires_grad=True)
        for drop in drops:
            x = checkpoint(drop, x)
            masks.append(x.detach() != 0)
        x.sum().backward()
    distinct = {tuple(m.tolist()) for m in masks}
    assert len(distinct) == 4, "a dropout mask was drawn twice"


def test_only_the_inputs_are_kept_and_a_frozen_input_still_reaches_the_parameters():
    layer = copy.deepcopy(_layers()[0]).eval()
    x = torch.randn(5, 8)  # requires no gradient, like the frozen embedding's output under LoRA
    _, kept = saved_activations(layer, checkpoint, layer, x)
    assert [s.shape for s in kept] == [(5, 8)]
    checkpoint(layer, x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())