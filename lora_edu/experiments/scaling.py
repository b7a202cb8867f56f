"""How the LoRA scale s should depend on the rank r: alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA).

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685, scale
the update by s = alpha / r. Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA" (rsLoRA), arXiv 2312.03732, argues for s = alpha / sqrt(r):

    y = s * B (A x),   A [r, in], B [out, r]
    y_i = s * sum_{j=1..r} B_ij (A x)_j      a sum of r terms of equal size,
    so std(y) ~ s * sqrt(r):  alpha / r shrinks like r^-0.5, alpha / sqrt(r) stays flat.

This module holds the measurements the scaling chapter and code/scaling_sweeps.py share: the
std of that product, the slope of a log-log line, the adapter's gradient norm at step 1, and
one seeded fine-tune of the tiny transformer with a given rank, scale and target set.
"""

from __future__ import annotations

import math

import torch

from ..methods.hparams import check_lora_hparams, lora_scaling
from ..methods.inject import count_trainable_params, inject_lora
from ..tiny.model import evaluate, lm_loss, pretrained_model, train
from ..tiny.tasks import FINETUNE, Task, make_batches

#: the target set the rank sweeps use: the attention projections of Hu et al.'s main experiments
QV_TARGETS = ("q_proj", "v_proj")


def update_std(r: int, scaling: float = 1.0, in_features: int = 256, out_features: int = 256,
               n_inputs: int = 256, seed: int = 0) -> float:
    """Standard deviation of the entries of scaling * B (A x) at a scale that does not depend on r.

    Each entry of A is N(0, 1 / in_features), so that each entry of A x has variance about 1,
    and each entry of B is N(0, 1): the factors have the same entry size whatever the rank,
    as after some training (at initialisation LoRA's B is zero, which would make y = 0).
    """
    check_lora_hparams(r, alpha=1.0)
    if not scaling > 0 or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a positive, finite number, got {scaling!r}; "
                         "use lora_scaling(alpha, r, rslora) to compute it")
    if min(in_features, out_features, n_inputs) <= 0:
        raise ValueError(f"in_features, out_features and n_inputs must be positive, "
                         f"got {in_features}, {out_features}, {n_inputs}")
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, in_features, generator=g) / math.sqrt(in_features)  # [r, in]
    B = torch.randn(out_features, r, generator=g)  # [out, r]
    x = torch.randn(n_inputs, in_features, generator=g)  # [n, in]
    y = scaling * (x @ A.T) @ B.T  # [n, r] @ [r, out] -> [n, out]
    return y.std().item()


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x): y ~ x^slope."""
    xs, ys = list(xs), list(ys)
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"loglog_slope needs two sequences of equal length >= 2, got {len(xs)} and {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("loglog_slope needs positive values: a logarithm of zero or less is undefined")
    lx = torch.tensor(xs, dtype=torch.float64).log()
    ly = torch.tensor(ys, dtype=torch.float64).log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return ((lx * ly).sum() / (lx * lx).sum()).item()


def adapter_grad_norm(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """L2 norm of the gradient of every trainable parameter on one batch [B, T + 1].

    With LoRA at step 1, B = 0, so only dL/dB = s * g (A x)^T is non-zero: its norm grows like
    s * sqrt(r), because A x has r entries of equal size. Gradients are cleared afterwards.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call inject_lora first")
    for p in params:
        p.grad = None
    lm_loss(model, batch).backward()
    norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in params))
    for p in params:
        p.grad = None
    return norm


def adapted_model(r: int | None, alpha: float = 16, rslora: bool = False, targets=QV_TARGETS,
                  init_seed: int = 0) -> torch.nn.Module:
    """The pretrained tiny transformer with fresh adapters, or, with r=None, fully trainable."""
    model = pretrained_model()  # a fresh copy of the cached base each call
    if r is None:
        return model  # full fine-tuning: every parameter trains
    torch.manual_seed(init_seed)  # the Kaiming draws of every lora_A
    return inject_lora(model, list(targets), r=r, alpha=alpha, rslora=rslora)


def finetune(r: int | None, alpha: float = 16, rslora: bool = False, targets=QV_TARGETS, steps: int = 300,
             lr: float = 1e-3, seed: int = 1, task: Task = FINETUNE, every: int = 10) -> dict:
    """Fine-tune the pretrained tiny transformer once; r=None means full fine-tuning.

    Returns a dict: the config, `scaling`, `trainable` (parameter count), `grad_norm` (of the
    trainable parameters on the first training batch, before any step), `curve` (the training
    loss averaged over each `every` steps), `final` (held-out loss after training). Seeded:
    the same arguments give the same numbers on the same machine.
    """
    if steps % every:
        raise ValueError(f"steps ({steps}) must be a multiple of every ({every}), so the curve has equal windows")
    model = adapted_model(r, alpha, rslora, targets)
    first = make_batches(task, 1, seed)[0]  # [B, T + 1], the batch train() draws first with this seed
    grad_norm = adapter_grad_norm(model, first)
    losses = train(model, task, steps, lr=lr, seed=seed, progress=False)
    curve = [sum(losses[i:i + every]) / every for i in range(0, steps, every)]
    final = evaluate(model, task)
    return {"r": r, "alpha": alpha, "rslora": rslora, "targets": list(targets) if r is not None else "all",
            "lr": lr, "steps": steps, "scaling": lora_scaling(alpha, r, rslora) if r is not None else None,
            "trainable": count_trainable_params(model), "grad_norm": grad_norm,
            "curve": curve, "final": final if math.isfinite(final) else None}


def step1_grad_norm(r: int, alpha: float = 16, rslora: bool = False, targets=QV_TARGETS, seed: int = 1,
                    task: Task = FINETUNE) -> float:
    """The adapter's gradient norm on the first fine-tuning batch, without training."""
    model = adapted_model(r, alpha, rslora, targets)
    return adapter_grad_norm(model, make_batches(task, 1, seed)[0])
