"""Putting LoRA into a whole model: find the target nn.Linear layers, wrap them, freeze the rest.

Targets match the way HF PEFT matches a list of `target_modules`: a module's full dotted
name either equals a target or ends with "." + target, so "q_proj" finds
"layers.0.attn.q_proj" but not "layers.0.attn.qq_proj".

Parameter count of LoRA on M layers, layer i of shape [d_i, k_i] (Hu et al. 2021, sec. 4):

    sum_i r * (d_i + k_i)
"""

from __future__ import annotations

from torch import nn

from .base import AdapterLayer
from .dora import DoRALinear
from .hparams import check_lora_hparams
from .lora import LoRALinear, check_bypass_dtype


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, target_modules, exclude=()) -> list[str]:
    """Full dotted names of the nn.Linear layers that the target patterns pick out.

    A pattern that matches no nn.Linear raises (naming the layers that do exist) rather than
    attaching nothing there. Names matching a pattern in `exclude` are never candidates.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(_matches(name, e) for e in exclude)}
    chosen = [name for name in linears if any(_matches(name, t) for t in targets)]
    missing = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if missing:
        available = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(
            f"target_modules {missing} matched no nn.Linear layer, so no adapter would be attached "
            f"there. Linear layers in this model (by last name component): {available}. "
            f"Full names look like {sorted(linears)[:5]}.")
    return chosen


def adapter_modules(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer in `model` (LoRA, DoRA, PiSSA, (IA)^3, ...), by its dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def check_no_adapters(model: nn.Module, entry: str = "inject_lora") -> None:
    """One adapter per model: a second injection would wrap adapters in adapters."""
    if adapter_modules(model):
        raise ValueError(f"this model already has adapter layers; call {entry} once per model "
                         "(for a fresh adapter, start from a fresh copy of the base model)")


def inject_lora(model: nn.Module, target_modules, r: int = 8, alpha: float = 16,
                dropout: float = 0.0, rslora: bool = False, dora: bool = False,
                bypass_dtype=None) -> nn.Module:
    """Wrap every nn.Linear whose name matches a target in a LoRALinear (or DoRALinear).

    Works in place and returns `model`. Everything that is not an adapter is frozen. Every
    check runs before the model is touched, so a bad call leaves it as it was. bypass_dtype
    (None: float32) is the dtype the bypass computes in; see lora_edu.methods.lora.
    """
    check_lora_hparams(r, alpha, dropout)
    check_bypass_dtype(bypass_dtype)
    check_no_adapters(model)
    chosen = resolve_targets(model, target_modules)
    cls = DoRALinear if dora else LoRALinear
    return wrap_modules(model, chosen, lambda name, base: cls(base, r=r, alpha=alpha, dropout=dropout,
                                                              rslora=rslora, bypass_dtype=bypass_dtype),
                        check=lambda name, base: cls.check_module(name, base, None))


def wrap_modules(model: nn.Module, names, make_layer, check=None) -> nn.Module:
    """Freeze `model` and replace each module named in `names` by make_layer(name, module).

    `check(name, module)`, if given, runs on every one of them first, so that a layer the
    method refuses (DoRA's zero row, a PiSSA rank above min(out, in)) raises before anything
    is changed. The inject_* entry points resolve target patterns to names and then call
    this; load_adapter calls it with the names an adapter file records.
    """
    names = list(names)
    if check is not None:
        for name in names:
            check(name, model.get_submodule(name))
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, make_layer(name, getattr(parent, child_name)))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (zero extra inference cost).

    A layer that cannot merge in place (QLoRA) raises its error before anything is merged,
    so the model is never left half merged.
    """
    layers = adapter_modules(model).values()
    for layer in layers:
        if not layer.mergeable:
            layer.merge()  # raises, with the way out in its message
    for layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora: take every adapter back out of its base weight.

    A layer that cannot unmerge ((IA)^3 with a zero scale) raises before anything is unmerged.
    """
    layers = adapter_modules(model).values()
    for layer in layers:
        layer.check_unmerge()
    for layer in layers:
        layer.unmerge()
    return model


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """requires_grad only on adapter parameters (each layer's adapter_parameter_names)."""
    model.requires_grad_(False)
    for layer in adapter_modules(model).values():
        for pname in layer.adapter_parameter_names:
            getattr(layer, pname).requires_grad_(True)
    return model


def count_trainable_params(model: nn.Module) -> int:
    """Number of scalars the optimizer will update."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
