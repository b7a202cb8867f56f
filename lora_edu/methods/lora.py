"""LoRA: a frozen linear layer plus a trainable low-rank bypass.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
Rank-stabilised scaling: Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA" (rsLoRA), arXiv 2312.03732.

Key equation (nn.Linear orientation, W0 [out, in]):

    h = W0 x + s * B (A x),    A [r, in], B [out, r],    s = alpha / r  (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B starts at zero, so the update dW = s * B @ A is zero at
step 0 while the gradient of B is not. After training, merge() folds dW into W0 so that
inference costs exactly one matmul again.

The bypass's compute dtype (`bypass_dtype`) is separate from the adapters' storage dtype,
which is always float32. The default, None, computes the bypass in float32, as HF PEFT does
without torch.autocast: on a float32 base nothing changes, and on a 16-bit base the bypass
rounds only once, at the end. torch.bfloat16 casts x, A and B to bf16 for the two small
matmuls (what torch.autocast does to PEFT's and ours), which skips a float32 copy of x per
adapted layer and runs the bypass at the base's speed; gradients still arrive in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer
from .hparams import check_lora_hparams, lora_scaling

BYPASS_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def check_bypass_dtype(dtype):
    """None (the adapters' own float32) or a floating dtype for the bypass's matmuls."""
    if dtype not in BYPASS_DTYPES:
        raise ValueError(f"bypass_dtype must be None (compute the bypass in the adapters' float32), "
                         f"torch.bfloat16 or torch.float16 (or torch.float32), got {dtype!r}")
    return dtype


class LoRALinear(AdapterLayer):
    """Wraps a frozen nn.Linear `base` and adds s * B @ A to its weight, lazily or merged.

    The adapter tensors are kept in float32 whatever the base dtype: an fp16 or bf16 Adam
    step on a small parameter rounds away (HF PEFT upcasts adapters the same way). The
    forward computes the bypass in `bypass_dtype` (None: the adapters' float32) and casts it
    to the base's output dtype.
    """

    #: parameter names that belong to the adapter (trained, saved, loaded)
    adapter_parameter_names = ("lora_A", "lora_B")
    method = "lora"
    config_keys = ("method", "r", "alpha", "rslora", "dropout")
    training_only_keys = ("dropout",)
    base_type = nn.Linear  # QLoRALinear wraps a frozen 4-bit layer instead

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, bypass_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base, self.base_type):
            wanted = "nn.Linear" if self.base_type is nn.Linear else self.base_type.__name__
            raise TypeError(f"{type(self).__name__} wraps an {wanted}, got {type(base).__name__}; "
                            "for a whole model use inject_lora(model, target_modules=[...])")
        check_lora_hparams(r, alpha, dropout)
        self.bypass_dtype = check_bypass_dtype(bypass_dtype)
        self.base = base
        self.r, self.alpha, self.rslora, self.dropout_p = int(r), alpha, bool(rslora), float(dropout)
        self.scaling = lora_scaling(alpha, r, rslora)
        device = next(iter([*base.parameters(), *base.buffers()])).device  # adapters live beside W0
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # [r, in]
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=device))  # [out, r]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters_()
        self.check_base()  # before anything is frozen: a refused layer is left as it was
        base.requires_grad_(False)  # W0 (and its bias) stay frozen

    def check_base(self) -> None:
        """Raise if this method cannot adapt the base; LoRA takes any weight (DoRA refuses zero rows)."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @torch.no_grad()
    def reset_lora_parameters_(self) -> None:
        """A ~ Kaiming-uniform with a = sqrt(5) (nn.Linear's own default), B = 0, so dW = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """dW = s * B @ A, shape [out, in], in float32."""
        return self.scaling * (self.lora_B @ self.lora_A)  # [out, r] @ [r, in] -> [out, in]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the bypass computes in: bypass_dtype, or the adapters' own (float32)."""
        return self.bypass_dtype or self.lora_A.dtype

    def bypass_input(self, x: torch.Tensor) -> torch.Tensor:
        """x cast to the bypass dtype, then dropped out (PEFT's order); the base sees x itself."""
        return self.lora_dropout(x.to(self.compute_dtype))

    def lora_product(self, x: torch.Tensor) -> torch.Tensor:
        """s * B (A x) in the bypass dtype, for x from bypass_input, in PEFT's order of operations."""
        dtype = self.compute_dtype
        a, b = self.lora_A.to(dtype), self.lora_B.to(dtype)  # no copy when dtype is theirs
        return ((x @ a.T) @ b.T) * self.scaling  # [..., r] -> [..., out]; PEFT: lora_B(lora_A(x)) * s

    def add_lora_product(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + s * B (A x), for x from bypass_input, in out's dtype.

        By default in PEFT's arithmetic, to the bit. With a bypass_dtype set and out in that
        dtype, faster: s goes into B (an [out, r] tensor) and the add into the second matmul
        (addmm), which skips two passes over the [tokens, out] output forward and one backward;
        that reorders the roundings (by an ulp or so), which is why it is not the default.
        """
        if self.bypass_dtype is None or out.dtype != self.bypass_dtype:
            return out + self.lora_product(x).to(out.dtype)
        dtype = self.bypass_dtype
        h = x.flatten(0, -2) @ self.lora_A.to(dtype).T  # [tokens, r]
        y = out if out.dim() == 2 else out.flatten(0, -2)  # [tokens, out]
        # in place: out is a fresh product that no backward needs, and an out-of-place addmm
        # would first copy all of it
        return y.addmm_(h, (self.lora_B * self.scaling).to(dtype).T).view(out.shape)  # [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # W0 x + b, [..., out]
        if self.merged:  # dW already lives inside base.weight
            return out
        return self.add_lora_product(out, self.bypass_input(x))

    def frozen_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 as a dense [out, in] tensor, in `dtype` or the one the base computes in.

        For a plain nn.Linear that is the weight itself; an NF4 base dequantizes it.
        """
        w = self.base.weight
        return w if dtype is None else w.to(dtype)

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x without the bias, in the base's dtype (DoRA rescales it)."""
        return F.linear(x, self.base.weight)  # [..., out]

    def frozen_tensors(self) -> tuple:
        """The tensors W0 is made of: the base's weight here (an NF4 base's codes and scales)."""
        return (self.base.weight,)

    def frozen_version(self) -> tuple:
        """Changes whenever those tensors are written in place (a write bumps a tensor's version).

        Half of a cache key only: a new tensor can be allocated where a freed one was, with
        version 0 again, so a cache must also check that the tensors are the ones it saw
        (DoRALinear keeps weak references to them).
        """
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in self.frozen_tensors())

    def merged_weight(self) -> torch.Tensor:
        """W0 + dW, [out, in] in float32: what merge() writes into the base."""
        return self.frozen_weight(torch.float32) + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + dW; afterwards the forward is a single base matmul. A no-op if merged."""
        if not self.merged:
            w = self.base.weight
            w.copy_(self.merged_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - dW, undoing merge() (exactly only up to the base dtype's rounding)."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def adapter_config(self) -> dict:
        """The hyper-parameters an adapter file records (see lora_edu.methods.adapters)."""
        return {"method": self.method, "r": self.r, "alpha": float(self.alpha), "rslora": self.rslora,
                "dropout": self.dropout_p}

    @classmethod
    def check_config(cls, config: dict) -> None:
        super().check_config(config)
        check_lora_hparams(config["r"], config["alpha"], config["dropout"])
        if not isinstance(config["rslora"], bool):
            raise TypeError(f"rslora={config['rslora']!r}; it must be true or false")

    def extra_repr(self) -> str:
        kind = "alpha/sqrt(r)" if self.rslora else "alpha/r"
        bypass = "" if self.bypass_dtype is None else f", bypass_dtype={self.bypass_dtype}"
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g} ({kind}){bypass}, merged={self.merged}"
