"""AdaLoRA: LoRA in SVD form, dW = P diag(lam) Q, whose singular values a global budget prunes.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv 2303.10512, section 3.1. Key equation (nn.Linear orientation, W0 [out, in]):

    h = W0 x + s * P diag(lam) Q x,    P [out, r], lam [r], Q [r, in],    s = alpha / r

P and Q start N(0, 0.02^2) and lam starts at zero, so dW = 0 at step 0 (and the first step
moves only lam: the gradients of P and Q carry a factor lam). Nothing else keeps P and Q near
orthogonal, as singular vectors are, so training adds the penalty

    R = weight * mean over the 2n matrices of the n layers of ||P^T P - I||_F and ||Q Q^T - I||_F

which is HF PEFT's; the paper writes squared norms, summed. Which lam the budget zeroes, and
when, is adalora_budget.py's part.

HF PEFT's names: P = lora_B [out, r], lam = lora_E [r, 1], Q = lora_A [r, in]. Its scale is
alpha / (ranknum + 1e-5) with ranknum = init_r for good (a relative 1e-5 / r from ours); neither
shrinks as triplets are pruned. PEFT saves a pruned adapter cut down to each layer's kept rank;
ours keeps init_r with lam = 0 and the mask (lam_mask), so every layer has one shape and config.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .adalora_budget import RankAllocator, adalora_layers, check_schedule
from .base import AdapterLayer
from .hparams import check_lora_hparams
from .inject import check_no_adapters, resolve_targets, wrap_modules


def check_adalora_hparams(init_r, alpha, dropout) -> None:
    """Raise for a layer rank, alpha or dropout that cannot work."""
    if isinstance(init_r, bool) or not isinstance(init_r, numbers.Integral) or init_r <= 0:
        raise ValueError(f"init_r must be a positive int (the rank before pruning, typically 12), got {init_r!r}")
    check_lora_hparams(init_r, alpha, dropout)


class AdaLoRALinear(AdapterLayer):
    """Wraps a frozen nn.Linear `base` and adds s * P diag(lam) Q to its weight, lazily or merged."""

    method = "adalora"
    adapter_parameter_names = ("P", "lam", "Q")
    adapter_buffer_names = ("lam_mask",)
    config_keys = ("method", "init_r", "alpha", "dropout")
    training_only_keys = ("dropout",)

    def __init__(self, base: nn.Linear, init_r: int = 12, alpha: float = 8.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"AdaLoRALinear wraps an nn.Linear, got {type(base).__name__}; for a whole model "
                            "use inject_adalora(model, target_modules=[...], total_step=...)")
        check_adalora_hparams(init_r, alpha, dropout)
        self.base = base
        self.r, self.alpha, self.dropout_p = int(init_r), alpha, float(dropout)
        self.scaling = alpha / init_r  # fixed at init_r: pruning zeroes lam, it does not rescale
        device = base.weight.device  # adapters live beside W0
        self.P = nn.Parameter(torch.empty(base.out_features, init_r, device=device))  # [out, r] left vectors
        self.lam = nn.Parameter(torch.zeros(init_r, device=device))  # [r] singular values, 0 so dW = 0
        self.Q = nn.Parameter(torch.empty(init_r, base.in_features, device=device))  # [r, in] right vectors
        # 1 where the last allocation kept triplet i; a record, not a gate (the forward uses lam):
        # between two allocations the optimizer may regrow a pruned lam, as in PEFT
        self.register_buffer("lam_mask", torch.ones(init_r, device=device))  # [r]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters_()
        base.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters_(self) -> None:
        """P, Q ~ N(0, 0.02^2) (PEFT's and the paper's Gaussian), lam = 0, every triplet kept."""
        nn.init.normal_(self.P, mean=0.0, std=0.02)
        nn.init.normal_(self.Q, mean=0.0, std=0.02)
        self.lam.zero_()
        self.lam_mask.fill_(1.0)

    @classmethod
    def check_module(cls, name: str, base: nn.Module, config: dict) -> None:
        """P [out, r] has at most min(out, in) orthonormal columns (Q likewise rows): refuse a larger r."""
        if isinstance(base, nn.Linear) and config["init_r"] > min(base.out_features, base.in_features):
            raise ValueError(f"init_r={config['init_r']} > min(out, in) = {min(base.out_features, base.in_features)} "
                             f"for {name!r} [{base.out_features}, {base.in_features}]: an SVD has no more triplets "
                             "than that; lower init_r or leave the layer out of target_modules")

    @classmethod
    def check_config(cls, config: dict) -> None:
        super().check_config(config)
        check_adalora_hparams(config["init_r"], config["alpha"], config["dropout"])

    def adapter_config(self) -> dict:
        return {"method": self.method, "init_r": self.r, "alpha": float(self.alpha), "dropout": self.dropout_p}

    def delta_weight(self) -> torch.Tensor:
        """dW = s * P diag(lam) Q, [out, in] in float32."""
        return self.scaling * (self.P @ (self.lam[:, None] * self.Q))  # [out, r] @ [r, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # W0 x + b, [..., out]
        if self.merged:  # dW already lives inside base.weight
            return out
        x = self.dropout(x.to(self.Q.dtype))
        h = x @ (self.Q * self.lam[:, None]).T  # [..., r]: lam_i * (Q x)_i, in PEFT's order
        return out + ((h @ self.P.T) * self.scaling).to(out.dtype)  # [..., out]

    def orthogonality(self) -> torch.Tensor:
        """[||P^T P - I||_F, ||Q Q^T - I||_F]: both 0 when P's columns and Q's rows are orthonormal."""
        eye = torch.eye(self.r, device=self.P.device)
        return torch.stack([torch.linalg.matrix_norm(self.P.T @ self.P - eye),  # [r, r]
                            torch.linalg.matrix_norm(self.Q @ self.Q.T - eye)])  # [r, r]

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + dW (a pruned triplet has lam = 0 and adds nothing). A no-op if merged."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - dW (exact only up to the base dtype's rounding)."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        kept = int(self.lam_mask.sum().item()) if self.lam_mask.device.type != "meta" else self.r
        return f"init_r={self.r}, kept={kept}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def orthogonal_penalty(model: nn.Module, weight: float = 0.5) -> torch.Tensor:
    """weight * the mean of ||P^T P - I||_F and ||Q Q^T - I||_F over every AdaLoRA layer.

    PEFT's orth_reg_weight defaults to 0.5, so train(..., regularizer=orthogonal_penalty) is
    PEFT's loss; another weight: regularizer=functools.partial(orthogonal_penalty, weight=0.1).
    """
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < float("inf"):
        raise ValueError(f"weight must be a finite number >= 0 (PEFT's orth_reg_weight, 0.5), got {weight!r}")
    return weight * torch.cat([layer.orthogonality() for layer in adalora_layers(model).values()]).mean()


def inject_adalora(model: nn.Module, target_modules, *, init_r: int = 12, target_r: int = 8, alpha: float = 8.0,
                   dropout: float = 0.0, total_step: int | None = None, tinit: int = 0, tfinal: int = 0,
                   deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85) -> tuple[nn.Module, RankAllocator]:
    """Wrap every matching nn.Linear in an AdaLoRALinear; returns (model, its RankAllocator).

    Works in place and freezes everything else. Every check runs before the model is touched.
    Train with both halves (PEFT's defaults, apart from the schedule):

        model, allocator = inject_adalora(model, ["q_proj", "v_proj"], total_step=150, tinit=20, tfinal=30)
        train(model, task, 150, regularizer=orthogonal_penalty, callback=allocator.callback)
    """
    check_adalora_hparams(init_r, alpha, dropout)
    check_schedule(init_r, target_r, total_step, tinit, tfinal, deltaT, beta1, beta2)
    check_no_adapters(model, "inject_adalora")
    chosen = resolve_targets(model, target_modules)
    config = {"method": AdaLoRALinear.method, "init_r": init_r, "alpha": alpha, "dropout": dropout}
    wrap_modules(model, chosen, lambda name, base: AdaLoRALinear(base, init_r, alpha, dropout),
                 check=lambda name, base: AdaLoRALinear.check_module(name, base, config))
    return model, RankAllocator(model, target_r, total_step=total_step, tinit=tinit, tfinal=tfinal,
                                deltaT=deltaT, beta1=beta1, beta2=beta2)
