"""The family chapter's measurements: every member of the LoRA family on one task, one budget.

Each method "patches one weakness of LoRA" (the tutorial's section 7); to see whether the
patch shows, they all fine-tune the same pretrained tiny transformer on the same task for the
same number of steps, from the same seeds, and only the method changes:

    lora      Hu et al. 2021                 B A on q, v, s = alpha / r
    rslora    Kalajdzievski 2023             s = alpha / sqrt(r)
    dora      Liu et al. 2024                + a trained length per output row
    pissa     Meng et al. 2024               A, B from W0's top r singular triplets, base = residual
    loraga    Wang et al. 2024               A, B from the SVD of the full gradient (4 batches)
    adalora   Zhang et al. 2023              P diag(lam) Q, rank 12 pruned to an average of 8
    loraplus  Hayou et al. 2024              lr(B) = 16 lr(A)
    ia3       Liu et al. 2022                scales on k, v and the FFN's inner activation
    full      (the reference)                every weight trains

One seeded run is `finetune_method(method, lr, seed)`; code/family_sweeps.py runs the grid and
stores it. `first_step_alignment` asks LoRA-GA's question directly: how well does the first
step of an adapter point along the first step of full fine-tuning?
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..methods.adalora import inject_adalora, orthogonal_penalty
from ..methods.adalora_budget import rank_pattern
from ..methods.ia3 import inject_ia3
from ..methods.inject import count_trainable_params, inject_lora
from ..methods.loraga import estimate_full_gradients, inject_loraga
from ..methods.pissa import inject_pissa
from ..tiny.model import evaluate, lm_loss, pretrained_model, train
from ..tiny.tasks import FINETUNE, PRETRAIN, Task, make_batches
from ..train.adam import Adam
from ..train.loraplus import loraplus_optimizer
from .scaling import QV_TARGETS

METHODS = ("lora", "rslora", "dora", "pissa", "loraga", "adalora", "loraplus", "ia3", "full")
R, ALPHA = 8, 16  # chapter 2's rank sweeps use alpha = 16 too
IA3_TARGETS, IA3_FEEDFORWARD = ("k_proj", "v_proj", "down_proj"), ("down_proj",)  # the paper's three places
ADALORA = dict(init_r=12, target_r=8, tinit=30, tfinal=60, deltaT=10, orth_reg_weight=0.5)
LORAPLUS_RATIO = 16  # the paper's starting point, 2^4
LORAGA_BATCHES = 4  # batches the full gradient is averaged over (the run's first four)


def build(method: str, seed: int = 1, steps: int = 300, task: Task = FINETUNE, r: int = R, targets=QV_TARGETS,
          all_linear_adalora: bool = False):
    """(model, optimizer_factory, regularizer, callback) for one method, from the pretrained base.

    init_seed = seed - 1 draws the adapters' random parts, as in the other chapters' sweeps.
    optimizer_factory(model, lr) builds the optimizer; regularizer and callback go to train().
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; the family chapter runs {METHODS}")
    model = pretrained_model()
    torch.manual_seed(seed - 1)
    adam = lambda m, lr: Adam([p for p in m.parameters() if p.requires_grad], lr=lr)  # noqa: E731
    regularizer = callback = None
    if method == "full":
        pass
    elif method in ("lora", "rslora", "dora", "loraplus"):
        inject_lora(model, list(targets), r=r, alpha=ALPHA, rslora=method == "rslora", dora=method == "dora")
        if method == "loraplus":
            adam = lambda m, lr: loraplus_optimizer(m, lr=lr, ratio=LORAPLUS_RATIO)  # noqa: E731
    elif method == "pissa":
        inject_pissa(model, list(targets), r=r, alpha=ALPHA)
    elif method == "loraga":
        batches = make_batches(task, LORAGA_BATCHES, seed)  # the first batches train() draws with this seed
        grads = estimate_full_gradients(model, list(targets), batches, lm_loss)
        inject_loraga(model, list(targets), grads, r=r, alpha=ALPHA)
    elif method == "adalora":
        names = list(targets) if not all_linear_adalora else ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]
        opts = {k: v for k, v in ADALORA.items() if k != "orth_reg_weight"}
        model, allocator = inject_adalora(model, names, alpha=ALPHA, total_step=steps, **opts)
        regularizer = lambda m: orthogonal_penalty(m, ADALORA["orth_reg_weight"])  # noqa: E731
        callback = allocator.callback
    elif method == "ia3":
        inject_ia3(model, IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD)
    return model, adam, regularizer, callback


def finetune_method(method: str, lr: float, seed: int = 1, steps: int = 300, every: int = 10,
                    task: Task = FINETUNE, all_linear_adalora: bool = False, return_model: bool = False):
    """One seeded fine-tune; a dict with the setting, `trainable`, `curve` (training loss averaged
    over each `every` steps), `final` (held-out loss on `task`), `pretrain_loss` (held-out loss on
    PRETRAIN: what was forgotten) and, for AdaLoRA, `ranks` (the ranks each matrix kept)."""
    if steps % every:
        raise ValueError(f"steps ({steps}) must be a multiple of every ({every}), so the curve has equal windows")
    model, make_optimizer, regularizer, callback = build(method, seed, steps, task,
                                                         all_linear_adalora=all_linear_adalora)
    losses = train(model, task, steps, lr=lr, seed=seed, progress=False, optimizer=make_optimizer(model, lr),
                   regularizer=regularizer, callback=callback)
    final, forgot = evaluate(model, task), evaluate(model, PRETRAIN)
    record = {"method": method, "lr": lr, "seed": seed, "steps": steps,
              "trainable": count_trainable_params(model),
              "curve": [sum(losses[i:i + every]) / every for i in range(0, steps, every)],
              "final": final if math.isfinite(final) else None,
              "pretrain_loss": forgot if math.isfinite(forgot) else None}
    if method == "adalora":
        record["ranks"] = rank_pattern(model)
    return (record, model) if return_model else record


def first_step_alignment(method: str, lr: float = 1e-3, seed: int = 1, task: Task = FINETUNE,
                         targets=QV_TARGETS) -> dict:
    """cos(dW_1, -G) per adapted matrix: how well the first optimizer step of a method points
    down the full fine-tuning gradient G (the direction of full fine-tuning's first SGD step).

    dW_1 is the change of the weight the layer computes with over one Adam step on the first
    batch; G is dL/dW0 on that same batch. LoRA-GA is built to make this cosine large; plain LoRA
    starts with B = 0, so its first step moves B only, along G A0^T: a rank-r slice of G through
    a random A0.
    """
    batch = make_batches(task, 1, seed)[0]
    full = estimate_full_gradients(pretrained_model(), list(targets), batch[None], lm_loss)
    model, make_optimizer, _, _ = build(method, seed, steps=1, task=task)
    layers = {name: model.get_submodule(name) for name in full}
    before = {name: _weight(layer) for name, layer in layers.items()}
    train(model, batch[None], 1, lr=lr, seed=seed, progress=False, optimizer=make_optimizer(model, lr))
    return {name: F.cosine_similarity((_weight(layer) - before[name]).flatten(), -full[name].flatten(), dim=0).item()
            for name, layer in layers.items()}


def _weight(module) -> torch.Tensor:
    """The weight a layer computes with, [out, in] float32 (merged_weight for an adapter layer)."""
    if hasattr(module, "merged_weight"):
        return module.merged_weight().detach().float().clone()
    return module.weight.detach().float().clone()
