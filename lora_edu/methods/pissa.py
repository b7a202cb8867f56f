"""PiSSA: LoRA started from W0's principal singular triplets, the residual frozen.

Meng, Wang and Zhang 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models", arXiv 2404.02948.

Key equation (nn.Linear orientation, W0 [out, in] = U diag(S) Vh, S sorted descending):

    A0 = diag(sqrt(S_r / s)) Vh_r      [r, in]        U_r = U[:, :r], S_r = S[:r], Vh_r = Vh[:r]
    B0 = U_r diag(sqrt(S_r / s))       [out, r]       so s * B0 @ A0 = U_r diag(S_r) Vh_r
    W_res = W0 - s * B0 @ A0 = U[:, r:] diag(S[r:]) Vh[r:]      the tail, frozen

Training moves the r directions that carry most of W0 and leaves its tail alone, where LoRA
starts from noise and zero. niter=None takes the exact SVD (torch.linalg.svd, PEFT's
init_lora_weights="pissa"); niter=K the randomised one of Halko et al. 2011, arXiv 0909.4061
(torch.svd_lowrank with q = r, PEFT's "pissa_niter_K"), which is faster on large weights,
draws from torch's global RNG (seed it for a repeatable init) and is only near the exact tail.
The shift, the buffers A0, B0 and the conversion to plain LoRA are in shifted.py.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .hparams import check_lora_hparams
from .inject import check_no_adapters, resolve_targets, wrap_modules
from .lora import check_bypass_dtype
from .shifted import ShiftedLoRALinear


def check_niter(niter) -> None:
    """None (the exact SVD) or a number of subspace iterations >= 0 for the randomised SVD."""
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, numbers.Integral) or niter < 0):
        raise ValueError(f"niter must be None (exact SVD) or an int >= 0 (randomised SVD with that many "
                         f"subspace iterations; PEFT's 'pissa_niter_4' is niter=4), got {niter!r}")


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """(A0 [r, in], B0 [out, r]) in float32 with s * B0 @ A0 = W0's top-r part."""
    w = weight.float()  # [out, in]; the SVD runs in float32 whatever the base dtype (as in PEFT)
    if niter is None:
        u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)  # [out, k], [k], [k, in]
        u, s_vals, vh = u[:, :r], s_vals[:r], vh[:r]
    else:
        u, s_vals, v = torch.svd_lowrank(w, q=r, niter=niter)  # [out, r], [r], [in, r]
        vh = v.T  # [r, in]
    root = (s_vals / scaling).sqrt()  # [r]: half of each singular value goes to A0, half to B0
    return root[:, None] * vh, u * root  # [r, in], [out, r]


class PiSSALinear(ShiftedLoRALinear):
    """A LoRALinear whose A, B start as W0's principal part; the base keeps W0's tail."""

    method = "pissa"
    config_keys = ("method", "r", "alpha", "rslora", "dropout", "niter")
    training_only_keys = ("dropout", "niter")  # niter shapes the init only: a file need not match it

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float | None = None, niter: int | None = None,
                 dropout: float = 0.0, rslora: bool = False, bypass_dtype: torch.dtype | None = None,
                 init: bool = True):
        """alpha=None: alpha = r, so s = 1 (the PiSSA paper's setting; PEFT's default pairs r=8, alpha=8).
        init=False skips the SVD and the shift, for a layer an adapter file fills (for_loading)."""
        check_niter(niter)
        super().__init__(base, r=r, alpha=r if alpha is None else alpha, dropout=dropout, rslora=rslora,
                         bypass_dtype=bypass_dtype)
        self.niter = niter
        if init:
            self.start_from_(*pissa_factors(self.base.weight, self.r, self.scaling, niter))

    @classmethod
    def check_config(cls, config: dict) -> None:
        super().check_config(config)
        check_niter(config["niter"])

    def adapter_config(self) -> dict:
        return {**super().adapter_config(), "niter": self.niter}

    def extra_repr(self) -> str:
        svd = "exact SVD" if self.niter is None else f"randomised SVD, niter={self.niter}"
        return f"{super().extra_repr()}, {svd}"


def inject_pissa(model: nn.Module, target_modules, r: int = 8, alpha: float | None = None,
                 niter: int | None = None, dropout: float = 0.0, rslora: bool = False,
                 bypass_dtype=None) -> nn.Module:
    """Wrap every nn.Linear matching a target in a PiSSALinear; in place, returns `model`.

    Every check (hyper-parameters, targets, each layer's dtype and rank) runs before the model
    is touched. The wrapped model computes what `model` did, up to the residual's rounding.
    """
    alpha = r if alpha is None else alpha
    check_lora_hparams(r, alpha, dropout)
    check_niter(niter)
    check_bypass_dtype(bypass_dtype)
    check_no_adapters(model, "inject_pissa")
    chosen = resolve_targets(model, target_modules)
    config = {"r": r}
    return wrap_modules(model, chosen, lambda name, base: PiSSALinear(base, r=r, alpha=alpha, niter=niter,
                                                                      dropout=dropout, rslora=rslora,
                                                                      bypass_dtype=bypass_dtype),
                        check=lambda name, base: PiSSALinear.check_module(name, base, config))
