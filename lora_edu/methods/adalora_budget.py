"""AdaLoRA's rank allocator: score every singular triplet, shrink a global budget, prune to it.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv 2303.10512, sections 3.2 (importance) and 3.3 (budget schedule). Each adapted layer holds
dW = P diag(lam) Q (lora_edu.methods.adalora); its triplet i is (P[:, i], lam[i], Q[i, :]).

Importance of every trained number w, after each optimizer step, from that step's gradient:

    I  = |w * dL/dw|                              sensitivity
    Ib = beta1 * Ib + (1 - beta1) * I             smoothed sensitivity
    Ub = beta2 * Ub + (1 - beta2) * |I - Ib|      uncertainty (against the new Ib)
    s(w) = Ib * Ub
    S_i = s(lam_i) + mean_j s(P_ji) + mean_j s(Q_ij)       the score of triplet i

Budget b(t), the number of triplets kept in the whole model (b0 = n * init_r, bT = n * target_r
over n layers; T = total_step):

    b(t) = b0                                                              t <= tinit
    b(t) = floor(bT + (b0 - bT) * (1 - (t - tinit) / (T - tfinal - tinit))^3)   up to T - tfinal
    b(t) = bT                                                              after

Every deltaT steps in between, the b0 - b(t) lowest-scoring triplets of the whole model, not
of each layer, get lam = 0; the optimizer may regrow them, and the next allocation decides
again. At t = T - tfinal a last allocation prunes to bT, and that mask is fixed: every later
step zeroes the same lam again. HF PEFT's RankAllocator and AdaLoraModel.update_and_allocate
compute the same; this class reads the layers' tensors instead of matching parameter names.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .inject import adapter_modules

TENSORS = ("P", "lam", "Q")  # what each triplet is made of, scored element by element


def adalora_layers(model: nn.Module) -> dict:
    """The AdaLoRA layers of `model` by dotted name; an error naming the way out if there are none."""
    layers = {name: m for name, m in adapter_modules(model).items() if m.method == "adalora"}
    if not layers:
        raise ValueError("the model has no AdaLoRA layers; call inject_adalora(model, target_modules, ...) first")
    return layers


def _check_int(name: str, value, low: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low} ({why}), got {name}={value!r}")


def check_schedule(init_r, target_r, total_step, tinit, tfinal, deltaT, beta1, beta2) -> None:
    """Raise ValueError for a schedule that cannot run, before anything is built."""
    if total_step is None:
        raise ValueError("total_step is required: the budget shrinks until total_step - tfinal, so AdaLoRA "
                         "must know how many steps training will take (pass the number of train steps)")
    _check_int("total_step", total_step, 1, "the number of training steps")
    _check_int("tinit", tinit, 0, "warm-up steps at the full budget")
    _check_int("tfinal", tfinal, 0, "final steps at the target budget")
    _check_int("deltaT", deltaT, 1, "steps between two allocations")
    _check_int("target_r", target_r, 1, "the average rank left per layer")
    if target_r > init_r:
        raise ValueError(f"target_r={target_r} > init_r={init_r}: AdaLoRA only prunes triplets, so the target "
                         "rank must be at most the initial one; raise init_r or lower target_r")
    if tinit + tfinal >= total_step:
        raise ValueError(f"tinit + tfinal = {tinit} + {tfinal} >= total_step={total_step} leaves no steps in "
                         "which the budget shrinks; lower tinit or tfinal, or raise total_step")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
            raise ValueError(f"{name} must be in [0, 1) (an EMA's memory; AdaLoRA uses 0.85), got {name}={beta!r}")


def budget_schedule(step: int, init_budget: int, target_budget: int, total_step: int, tinit: int,
                    tfinal: int) -> int:
    """b(step): how many triplets the whole model keeps at `step` (cubic from b0 down to bT)."""
    if step <= tinit:
        return init_budget
    if step > total_step - tfinal:
        return target_budget
    left = 1 - (step - tinit) / (total_step - tfinal - tinit)  # 1 at tinit, 0 at total_step - tfinal
    return int((init_budget - target_budget) * left ** 3 + target_budget)


class RankAllocator:
    """The importance EMAs and the budget of a model's AdaLoRA layers.

    Call step(model, t) after the optimizer step of every training step t = 1, 2, ..., with that
    step's gradients still in .grad (or pass `callback` to lora_edu.tiny.train). Its state, the
    EMAs, is training state like Adam's moments, and is not part of an adapter file.
    """

    def __init__(self, model: nn.Module, target_r: int = 8, total_step: int | None = None, tinit: int = 0,
                 tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85):
        layers = adalora_layers(model)
        self.ranks = {name: layer.r for name, layer in layers.items()}  # init_r of each layer
        check_schedule(min(self.ranks.values()), target_r, total_step, tinit, tfinal, deltaT, beta1, beta2)
        self.target_r, self.total_step, self.tinit, self.tfinal, self.deltaT = target_r, total_step, tinit, tfinal, deltaT
        self.beta1, self.beta2 = beta1, beta2
        self.init_budget = sum(self.ranks.values())  # b0: every triplet of every layer
        self.target_budget = target_r * len(self.ranks)  # bT: target_r per layer on average
        self.sensitivity, self.uncertainty = {}, {}  # (layer, "P" | "lam" | "Q") -> Ib, Ub shaped like it
        self.fixed = False  # True once the last allocation has run: the mask no longer changes

    def budget(self, step: int) -> int:
        return budget_schedule(step, self.init_budget, self.target_budget, self.total_step, self.tinit, self.tfinal)

    def callback(self, step: int, model: nn.Module) -> int:
        """step(model, step), in the argument order of lora_edu.tiny.train's callback."""
        return self.step(model, step)

    @torch.no_grad()
    def step(self, model: nn.Module, global_step: int) -> int:
        """Update the importance and, when the schedule says so, prune; returns the budget b(t)."""
        layers = self._layers(model)
        final = self.total_step - self.tfinal  # the step of the last allocation
        if global_step < final:
            self.update_importance(layers)
            if global_step > self.tinit and global_step % self.deltaT == 0:
                self.mask_to_budget(layers, self.budget(global_step))
        elif not self.fixed:  # the last allocation (PEFT does not update the EMAs at this step)
            self.mask_to_budget(layers, self.target_budget)
            self.fixed = True
            self.sensitivity, self.uncertainty = {}, {}  # no longer needed
        else:  # fixed: re-zero what the optimizer regrew
            for layer in layers.values():
                layer.lam.masked_fill_(layer.lam_mask == 0, 0.0)
        return self.budget(global_step)

    def _layers(self, model: nn.Module) -> dict:
        layers = adalora_layers(model)
        if {name: layer.r for name, layer in layers.items()} != self.ranks:
            raise ValueError(f"this allocator was built for the AdaLoRA layers {sorted(self.ranks)}, the model "
                             f"has {sorted(layers)}; build one RankAllocator per model")
        return layers

    def update_importance(self, layers: dict) -> None:
        """Ib and Ub of every number in P, lam and Q, from |w * grad| of the step just taken."""
        for name, layer in layers.items():
            for t in TENSORS:
                w = getattr(layer, t)
                if w.grad is None:
                    raise RuntimeError(f"{name}.{t} has no gradient; call step() after backward() and the "
                                       "optimizer step, before the gradients are zeroed")
                ipt = (w * w.grad).abs()  # I, shaped like w
                zero = torch.zeros_like(w)
                sens = self.beta1 * self.sensitivity.get((name, t), zero) + (1 - self.beta1) * ipt
                unc = self.uncertainty.get((name, t), zero)
                self.uncertainty[name, t] = self.beta2 * unc + (1 - self.beta2) * (ipt - sens).abs()
                self.sensitivity[name, t] = sens

    def triplet_scores(self) -> dict:
        """{layer: S [r]}: s(lam_i) + the mean s over P's column i + the mean s over Q's row i."""
        if not self.sensitivity:
            raise RuntimeError("no importance yet: call step() after every optimizer step, from step 1")
        s = {key: self.sensitivity[key] * self.uncertainty[key] for key in self.sensitivity}
        return {name: s[name, "lam"] + (s[name, "Q"].mean(dim=1) + s[name, "P"].mean(dim=0))  # [r]
                for name in self.ranks}

    def mask_to_budget(self, layers: dict, budget: int) -> None:
        """Zero lam of the init_budget - budget lowest-scoring triplets of the model; record the mask."""
        scores = self.triplet_scores()
        prune = self.init_budget - budget
        # the prune-th smallest score over all layers; ties at it all go, as in PEFT
        threshold = torch.kthvalue(torch.cat(list(scores.values())), prune).values if prune > 0 else -torch.inf
        for name, layer in layers.items():
            keep = scores[name] > threshold  # [r]
            layer.lam.masked_fill_(~keep, 0.0)
            layer.lam_mask.copy_(keep)


def rank_pattern(model: nn.Module) -> dict:
    """{layer name: triplets kept by the last allocation} (init_r before the first one)."""
    return {name: int(layer.lam_mask.sum().item()) for name, layer in adalora_layers(model).items()}
