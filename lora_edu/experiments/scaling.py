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

import copy
import math

import torch

from ..methods.hparams import check_lora_hparams, lora_scaling
from ..methods.inject import adapter_modules, count_trainable_params, inject_lora
from ..quant.qlora import prepare_qlora
from ..tiny.model import evaluate, lm_loss, pretrained_model, train
from ..tiny.tasks import FINETUNE, PRETRAIN, Task, make_batches

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


#: what the frozen base is stored in: float32 (as pretrained), bfloat16 (16-bit LoRA), or NF4 (QLoRA)
BASES = ("fp32", "bf16", "nf4")


def adapted_model(r: int | None, alpha: float = 16, rslora: bool = False, targets=QV_TARGETS,
                  init_seed: int = 0, base: str = "fp32", dora: bool = False) -> torch.nn.Module:
    """The pretrained tiny transformer with fresh adapters, or, with r=None, fully trainable.

    base="bf16" casts the frozen model to bfloat16 before the adapters go in; base="nf4" is the
    QLoRA recipe (prepare_qlora: every linear layer but the head in NF4 with double
    quantization, bfloat16 compute). The adapters themselves are float32 in every case.
    dora=True makes them DoRA adapters (QDoRA on the NF4 base).
    """
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if r is None and base != "fp32":
        raise ValueError(f"full fine-tuning trains the float32 weights themselves; base={base!r} needs an adapter rank r")
    model = pretrained_model()  # a fresh copy of the cached base each call
    if r is None:
        return model  # full fine-tuning: every parameter trains
    torch.manual_seed(init_seed)  # the Kaiming draws of every lora_A
    if base == "nf4":
        return prepare_qlora(model, list(targets), r=r, alpha=alpha, rslora=rslora, dora=dora)
    if base == "bf16":
        model.to(torch.bfloat16)
    return inject_lora(model, list(targets), r=r, alpha=alpha, rslora=rslora, dora=dora)


class Float32Logits(torch.nn.Module):
    """A 16-bit model whose logits come out in float32, so that the loss is computed in float32, as
    transformers' models do. Only the loss changes: the model's own computation stays 16-bit."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).float()  # [B, T, vocab]


def weight_deltas(model: torch.nn.Module, targets=QV_TARGETS) -> dict:
    """The update each targeted matrix received, {module name: dW [out, in] float32}.

    For an adapted model dW = s B A of every LoRA layer; for a fully fine-tuned one the
    trained weight minus the pretrained one (pretrained_model() gives the same start).
    """
    layers = adapter_modules(model)
    if layers:
        return {name: layer.delta_weight().detach().float() for name, layer in layers.items()}
    start = dict(pretrained_model().named_modules())
    return {name: (m.weight - start[name].weight).detach().float() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}


@torch.no_grad()
def truncate_updates(model: torch.nn.Module, k: int, targets=QV_TARGETS) -> torch.nn.Module:
    """A copy of a fully fine-tuned model whose targeted matrices keep only the best rank-k part of
    their update: W0 + U_k S_k V_k^T of dW = W - W0 (W0 from pretrained_model()). k = min(out, in)
    gives the fine-tuned model back; small k asks how much of fine-tuning a rank-k update holds."""
    if k < 1:
        raise ValueError(f"k must be a positive rank, got {k}")
    start = dict(pretrained_model().named_modules())
    cut = copy.deepcopy(model)
    for name, delta in weight_deltas(model, targets).items():
        u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        low = (u[:, :k] * sv[:k]) @ vh[:k]  # [out, in], the best rank-k approximation (Eckart-Young)
        cut.get_submodule(name).weight.copy_(start[name].weight + low.to(start[name].weight.dtype))
    return cut


def finetune(r: int | None, alpha: float = 16, rslora: bool = False, targets=QV_TARGETS, steps: int = 300,
             lr: float = 1e-3, seed: int = 1, task: Task = FINETUNE, every: int = 10, init_seed: int | None = None,
             base: str = "fp32", return_model: bool = False, dora: bool = False, callback=None):
    """Fine-tune the pretrained tiny transformer once; r=None means full fine-tuning.

    seed draws the training batches; init_seed (default seed - 1) the adapters' A. Returns a
    dict: the config, `scaling`, `trainable` (parameter count), `grad_norm` (of the trainable
    parameters on the first training batch, before any step), `curve` (the training loss
    averaged over each `every` steps), `final` (held-out loss on `task` after training) and
    `pretrain_loss` (held-out loss on the pretraining task PRETRAIN after training: what was
    forgotten). With return_model=True, (that dict, the trained model). Seeded: the same
    arguments give the same numbers on the same machine. dora=True trains DoRA adapters;
    callback(step, model) runs after every optimizer step (lora_edu.tiny.model.train).
    """
    if steps % every:
        raise ValueError(f"steps ({steps}) must be a multiple of every ({every}), so the curve has equal windows")
    init_seed = seed - 1 if init_seed is None else init_seed
    if dora and r is None:
        raise ValueError("dora=True needs an adapter rank r; r=None is full fine-tuning")
    model = adapted_model(r, alpha, rslora, targets, init_seed, base, dora)
    net = model if base == "fp32" else Float32Logits(model)  # a bf16 cross-entropy would round the loss
    first = make_batches(task, 1, seed)[0]  # [B, T + 1], the batch train() draws first with this seed
    grad_norm = adapter_grad_norm(net, first)
    losses = train(net, task, steps, lr=lr, seed=seed, progress=False, callback=callback)
    curve = [sum(losses[i:i + every]) / every for i in range(0, steps, every)]
    final, forgot = evaluate(net, task), evaluate(net, PRETRAIN)
    record = {"r": r, "alpha": alpha, "rslora": rslora, **({"dora": True} if dora else {}), "targets": list(targets) if r is not None else "all",
              "lr": lr, "steps": steps, "seed": seed, "init_seed": init_seed, "base": base,
              "scaling": lora_scaling(alpha, r, rslora) if r is not None else None,
              "trainable": count_trainable_params(model), "grad_norm": grad_norm,
              "curve": curve, "final": final if math.isfinite(final) else None,
              "pretrain_loss": forgot if math.isfinite(forgot) else None}
    return (record, model) if return_model else record


def step1_grad_norm(r: int, alpha: float = 16, rslora: bool = False, targets=QV_TARGETS, seed: int = 1,
                    task: Task = FINETUNE) -> float:
    """The adapter's gradient norm on the first fine-tuning batch, without training."""
    model = adapted_model(r, alpha, rslora, targets, init_seed=seed - 1)
    return adapter_grad_norm(model, make_batches(task, 1, seed)[0])
