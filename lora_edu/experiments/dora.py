"""The DoRA chapter's measurements: how fine-tuning moves each row's magnitude and direction.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353, section 2.2
(their Figure 2) take a weight apart per output row (a column in their [in, out] notation),
W = m * V / ||V||, and follow a fine-tune through its checkpoints t:

    dM_t = mean over rows i of | ||W_t[i]|| - ||W_0[i]|| |          the magnitude's change
    dD_t = mean over rows i of 1 - cos(W_t[i], W_0[i])             the direction's change

One point (dM_t, dD_t) per adapted matrix and checkpoint. They report that full fine-tuning
and DoRA put these points on a line of negative slope (large changes of direction come with
small changes of magnitude and the other way round) and LoRA on a line of positive slope (the
two grow together). This module measures the same, on the tiny model, and holds the
paper's DoRA forward written out in full (building W'), to compare costs with the fast one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.lora import LoRALinear
from ..tiny.model import pretrained_model


def magnitude_direction_change(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """(dM, dD) of a weight w against its start w0, both [out, in]: see the module docstring."""
    if w0.shape != w.shape or w0.dim() != 2:
        raise ValueError(f"w0 and w must be [out, in] matrices of one shape, got {tuple(w0.shape)} and {tuple(w.shape)}")
    w0, w = w0.double(), w.double()
    d_m = (w.norm(dim=1) - w0.norm(dim=1)).abs().mean().item()
    d_d = (1 - F.cosine_similarity(w, w0, dim=1)).mean().item()
    return d_m, d_d


def current_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer computes with now, [out, in] float32: W0 + dW for LoRA, W' for DoRA."""
    if isinstance(module, LoRALinear):
        return module.merged_weight().detach()
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    raise TypeError(f"expected an nn.Linear or a LoRA/DoRA layer, got {type(module).__name__}")


class Tracker:
    """A train() callback recording (dM, dD) of the named matrices every `every` steps.

    `points` maps step -> {matrix name: [dM, dD]}; the start is the pretrained model's weight.
    """

    def __init__(self, names, every: int = 25):
        if every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        start = dict(pretrained_model().named_modules())
        self.names, self.every = list(names), every
        self.start = {name: start[name].weight.detach().float() for name in self.names}
        self.points: dict[int, dict[str, list[float]]] = {}

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every == 0:
            self.points[step] = {name: list(magnitude_direction_change(self.start[name],
                                                                       current_weight(model.get_submodule(name))))
                                 for name in self.names}


def pearson(xs, ys) -> float:
    """Pearson's correlation of two equally long sequences."""
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    if len(xs) != len(ys) or len(xs) < 3:
        raise ValueError(f"pearson needs two sequences of equal length >= 3, got {len(xs)} and {len(ys)}")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        raise ValueError("pearson of a constant sequence is undefined")
    return sxy / math.sqrt(sxx * syy)


def md_points(run: dict, only: str | None = None) -> list[tuple[int, str, float, float]]:
    """[(step, matrix, dD, dM)] of one stored run of code/dora_sweeps.py (run["md"] is {step: {matrix: [dM, dD]}}),
    for the matrices whose name contains `only` (default: all)."""
    return [(int(step), name, d, m) for step, by_matrix in run["md"].items() for name, (m, d) in by_matrix.items()
            if only is None or only in name]


def md_correlation(run: dict, only: str | None = None) -> float:
    """Pearson's correlation of dD and dM over a run's points, pooled over checkpoints and matrices."""
    _, _, ds, ms = zip(*md_points(run, only))
    return pearson(ds, ms)


def md_correlation_across(run: dict) -> float:
    """The correlation of dD and dM across the tracked matrices at each checkpoint, averaged over checkpoints.

    Unlike the pooled one, it ignores what all matrices share over time (both grow as training goes on).
    """
    by_step: dict[int, list] = {}
    for step, _, d, m in md_points(run):
        by_step.setdefault(step, []).append((d, m))
    values = [pearson(*zip(*points)) for points in by_step.values()]
    return sum(values) / len(values)


def slope(xs, ys) -> float:
    """Least-squares slope of ys against xs."""
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("slope against a constant sequence is undefined")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def paper_forward(layer, x: torch.Tensor, detach_norm: bool = True) -> torch.Tensor:
    """DoRA as the paper writes it, for a DoRALinear: W' = m V / ||V|| built in float32, then one matmul.

    What DoRALinear's forward avoids; detach_norm=False lets the gradient flow through ||V||
    too (the paper's section 4.3 drops it), to measure what detaching saves.
    """
    v = layer.frozen_weight().float() + layer.scaling * layer.lora_B @ layer.lora_A  # [out, in]
    norm = v.norm(dim=1, keepdim=True)  # [out, 1]
    if detach_norm:
        norm = norm.detach()
    w = layer.magnitude[:, None] * v / norm
    bias = None if layer.base.bias is None else layer.base.bias.float()
    return F.linear(x.float(), w, bias).to(x.dtype)
