"""Measured memory: the bytes a training step really holds, counted tensor by tensor.

The ledger (lora_edu.memory.ledger) predicts; this module measures, on any device, with nothing but
the tensors themselves:

* weights, gradients, master copies and optimizer states: the bytes of each tensor, split
  into base and adapter (the `lora_` parameters), after a real optimizer step;
* activations: every tensor autograd saves for the backward, caught as it is saved with
  torch.autograd.graph.saved_tensors_hooks. A storage saved by several ops (the norm output
  that feeds q, k and v) counts once; parameters and buffers are left out, since they are
  weights, not activations. Sizes are of the whole storage, so a saved view of a bigger
  tensor (the token ids, sliced from [batch, seq + 1]) counts the tensor it views.

On a GPU, torch.cuda.max_memory_allocated gives the peak as well; code/measure_memory.py
records both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..methods.inject import adapter_modules
from ..quant.qlora import NF4Linear
from ..train.adam import Adam


@dataclass
class SavedTensor:
    """One storage autograd kept for the backward."""

    module: str  # the innermost module whose forward was running when it was saved
    shape: tuple
    dtype: torch.dtype
    nbytes: int  # bytes of its whole storage


def _storage_key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def saved_activations(model: nn.Module, fn, *args):
    """Run fn(*args) (a forward of `model`) and return (its result, [SavedTensor, ...])."""
    weights = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    seen, saved, where = set(), [], ["(outside any module)"]

    def enter(name):
        return lambda module, inputs: where.append(name)

    def leave(module, inputs, output):
        where.pop()

    hooks = [h for name, m in model.named_modules()
             for h in (m.register_forward_pre_hook(enter(name or "(model)")), m.register_forward_hook(leave))]

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in weights and key not in seen:
            seen.add(key)
            saved.append(SavedTensor(where[-1], tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = fn(*args)
    finally:
        for h in hooks:
            h.remove()
    return result, saved


def _nbytes(tensors) -> int:
    unique = {_storage_key(t): t.untyped_storage().nbytes() for t in tensors}
    return sum(unique.values())


@dataclass
class MeasuredStep:
    """Bytes held after one forward, backward and optimizer step; fields as in ledger.Ledger."""

    weights: int = 0
    gradients: int = 0
    master_weights: int = 0
    optimizer_states: int = 0
    lora_weights: int = 0
    lora_gradients: int = 0
    lora_master_weights: int = 0
    lora_optimizer_states: int = 0
    quant_constants: int = 0
    activations: int = 0  # saved for the backward, summed over `saved`
    saved: list = field(default_factory=list, repr=False)  # [SavedTensor], in the order they were saved
    loss: float = float("nan")

    def terms(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k not in ("saved", "loss")}


def measure_step(model: nn.Module, batch: torch.Tensor, optimizer: Adam, loss_fn=None) -> MeasuredStep:
    """One training step of `model` on `batch`, with every byte it holds counted.

    The optimizer is a lora_edu.Adam (or PagedAdam) over the model's trainable parameters;
    loss_fn(model, batch) defaults to lora_edu.tiny.model.lm_loss. Gradients are counted after
    the step, before they are cleared.
    """
    if not isinstance(optimizer, Adam):
        raise TypeError(f"measure_step reads the states of a lora_edu.Adam, got {type(optimizer).__name__}")
    if loss_fn is None:
        from ..tiny.model import lm_loss as loss_fn
    model.train()
    optimizer.zero_grad()
    loss, saved = saved_activations(model, loss_fn, model, batch)
    loss.backward()
    optimizer.step()

    adapter_ids = {id(p) for layer in adapter_modules(model).values() for p in layer.parameters()
                   if p.requires_grad}
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    params = list(model.parameters())
    base = [p for p in params if id(p) not in adapter_ids]
    lora = [p for p in params if id(p) in adapter_ids]

    def states(ps):
        return [s for p in ps if id(p) in optimizer.state for s in optimizer.state[id(p)]]

    def masters(ps):
        return [optimizer.master[id(p)] for p in ps if id(p) in optimizer.master]

    step = MeasuredStep(loss=loss.item(), saved=saved)
    step.weights = _nbytes(base) + sum(m.codes.nbytes for m in nf4)
    step.quant_constants = sum(m.nbytes - m.codes.nbytes - (0 if m.bias is None else m.bias.nbytes) for m in nf4)
    step.gradients = _nbytes(p.grad for p in base if p.grad is not None)
    step.master_weights, step.optimizer_states = _nbytes(masters(base)), _nbytes(states(base))
    step.lora_weights = _nbytes(lora)
    step.lora_gradients = _nbytes(p.grad for p in lora if p.grad is not None)
    step.lora_master_weights, step.lora_optimizer_states = _nbytes(masters(lora)), _nbytes(states(lora))
    step.activations = sum(s.nbytes for s in saved)
    return step
