"""(IA)^3: learned vectors that rescale the keys, the values and the FFN's inner activation.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", arXiv 2205.05638 (section 3.3). Key equations (nn.Linear orientation,
W [out, in], b [out]):

    k_proj, v_proj (scale the output):   y = l * (W x + b)    merged: W <- diag(l) W, b <- l * b
    down_proj (scale the input):         y = W (l * x) + b    merged: W <- W diag(l), b unchanged

l starts at ones, so the model starts as the pretrained one. Unlike LoRA nothing is added to W:
each layer trains out (or in) numbers, O(d) instead of LoRA's r (d + k).

As in HF PEFT, the vector is `ia3_l`, stored in the shape that broadcasts against W: [out, 1]
for an output scale, [1, in] for an input scale, so merging is W * l either way.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer
from .inject import check_no_adapters, resolve_targets, wrap_modules


def _names(value, what: str) -> list[str]:
    """A str or a list of non-empty str, as a list; a ValueError naming `what` otherwise."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must be a list of module names, got {value!r}")
    return list(names)


class IA3Linear(AdapterLayer):
    """Wraps a frozen nn.Linear `base` and rescales its output (or, feedforward=True, its input) by l."""

    method = "ia3"
    adapter_parameter_names = ("ia3_l",)
    # which layers scale their input: the file records their names, so a loader knows each l's shape
    config_keys = ("method", "feedforward_modules")

    def __init__(self, base: nn.Linear, feedforward: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"IA3Linear wraps an nn.Linear, got {type(base).__name__}; for a whole model use "
                            "inject_ia3(model, target_modules=[...], feedforward_modules=[...])")
        if not isinstance(feedforward, bool):
            raise TypeError(f"feedforward must be True (scale the input, as for down_proj) or False (scale "
                            f"the output, as for k_proj and v_proj), got {feedforward!r}")
        self.base, self.feedforward = base, feedforward
        self.feedforward_modules = None  # the model's input-scaled layers, by name: set by inject_ia3
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)  # [1, in] or [out, 1]
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device))  # ones: y = base(x) at init
        self.merged = False
        base.requires_grad_(False)  # W (and its bias) stay frozen

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # l already lives inside base.weight (and base.bias)
            return self.base(x)
        l = self.ia3_l.flatten()  # [in] or [out], float32
        if self.feedforward:
            return self.base((x.to(l.dtype) * l).to(x.dtype))  # W (l * x) + b, [..., out]
        out = self.base(x)  # W x + b, [..., out]
        return (out * l).to(out.dtype)  # l * (W x + b): the bias is scaled too, as in PEFT

    def merged_weight(self) -> torch.Tensor:
        """diag(l) W or W diag(l), [out, in] in float32: what merge() writes into the base."""
        return self.base.weight.float() * self.ia3_l.detach()  # [out, in] * [out, 1] or [1, in]

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W * l (and b <- l * b for an output scale). A no-op if merged."""
        if self.merged:
            return
        if not torch.isfinite(self.ia3_l).all():
            raise ValueError("IA3Linear cannot merge: ia3_l holds inf or NaN, which would be written into "
                             "the base weight; check the training run that produced it")
        w, b = self.base.weight, self.base.bias
        w.copy_(self.merged_weight().to(w.dtype))
        if b is not None and not self.feedforward:
            b.copy_((b.float() * self.ia3_l.flatten()).to(b.dtype))  # [out]
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W / l (and b <- b / l), undoing merge() up to rounding.

        PEFT divides by l + 1e-8, which turns an l of 0 into a huge finite weight. A zero in l
        zeroed its row (or column) of W at merge time, so nothing can bring it back: refused.
        """
        if not self.merged:
            return
        self.check_unmerge()
        w, b = self.base.weight, self.base.bias
        w.copy_((w.float() / self.ia3_l).to(w.dtype))
        if b is not None and not self.feedforward:
            b.copy_((b.float() / self.ia3_l.flatten()).to(b.dtype))
        self.merged = False

    def check_unmerge(self) -> None:
        """A merged zero in l cannot be undone; unmerge_lora asks every layer this before it unmerges any."""
        zero = torch.nonzero(self.ia3_l.flatten() == 0).flatten().tolist() if self.merged else []
        if zero:
            side = "columns" if self.feedforward else "rows"
            raise ValueError(f"IA3Linear cannot unmerge: ia3_l is 0 at {len(zero)} position(s) {zero[:8]}, so "
                             f"merge() set those {side} of W to 0 and W / l is 0 / 0. The layer is left merged; "
                             "to get the base back, reload its weights (e.g. a fresh pretrained model).")

    def adapter_config(self) -> dict:
        if self.feedforward_modules is None:
            raise ValueError("this IA3Linear was not made by inject_ia3, so it does not know which layers of "
                             "its model scale their input; inject with inject_ia3 to save an adapter file")
        return {"method": self.method, "feedforward_modules": sorted(self.feedforward_modules)}

    @classmethod
    def check_config(cls, config: dict) -> None:
        super().check_config(config)
        ff = config["feedforward_modules"]
        if not isinstance(ff, list) or not all(isinstance(n, str) and n for n in ff):
            raise TypeError(f"feedforward_modules={ff!r}; it must be a list of module names")
        if "targets" in config and not set(ff) <= set(config["targets"]):
            raise ValueError(f"feedforward_modules {sorted(set(ff) - set(config['targets']))} are not adapted "
                             "modules (targets); every feedforward layer must be a target")

    @classmethod
    def for_loading(cls, base: nn.Module, config: dict, name: str | None = None) -> IA3Linear:
        """Whether l scales the input depends on the module's name (is it in feedforward_modules?)."""
        if name is None:
            raise ValueError("an (IA)^3 file loads into a model that has inject_ia3(model, targets, "
                             "feedforward_modules) already; an IA3Linear's shape depends on its module name")
        layer = cls(base, feedforward=name in config["feedforward_modules"])
        layer.feedforward_modules = tuple(config["feedforward_modules"])
        return layer

    def extra_repr(self) -> str:
        return f"scales={'input' if self.feedforward else 'output'}, merged={self.merged}"


def inject_ia3(model: nn.Module, target_modules=("k_proj", "v_proj", "down_proj"),
               feedforward_modules=("down_proj",)) -> nn.Module:
    """Wrap every nn.Linear matching a target in an IA3Linear; those matching a feedforward
    pattern scale their input. Works in place and returns `model`; only the vectors train.

    As in PEFT, feedforward_modules must be a subset of target_modules (the same strings).
    Every check runs before the model is touched, so a bad call leaves it as it was.
    """
    check_no_adapters(model, "inject_ia3")
    chosen = resolve_targets(model, target_modules)  # raises for a target that matches no nn.Linear
    targets = _names(target_modules, "target_modules")
    ff = _names(feedforward_modules, "feedforward_modules")
    stray = [f for f in ff if f not in targets]
    if stray:
        raise ValueError(f"feedforward_modules {stray} are not in target_modules {targets}: a feedforward "
                         "layer is a target whose input is scaled; add them to target_modules or drop them")
    ff_names = tuple(sorted(resolve_targets(model, ff))) if ff else ()  # within chosen: ff is a subset of targets

    def make_layer(name: str, base: nn.Linear) -> IA3Linear:
        layer = IA3Linear(base, feedforward=name in ff_names)
        layer.feedforward_modules = ff_names
        return layer

    return wrap_modules(model, chosen, make_layer)


def ia3_param_count(shapes) -> int:
    """sum of out over output-scaled layers plus in over input-scaled ones, for (out, in, feedforward)."""
    total = 0
    for shape in shapes:
        out_f, in_f, ff = shape
        sizes_ok = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (out_f, in_f))
        if not sizes_ok or not isinstance(ff, bool):
            raise ValueError(f"shapes must be (out, in, feedforward) triples of positive ints and a bool, got {shape!r}")
        total += in_f if ff else out_f
    return total
