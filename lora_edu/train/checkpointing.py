"""Gradient checkpointing: keep each layer's input, rebuild its activations during backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", arXiv 1604.06174. A
layer normally leaves every tensor its backward needs (norm inputs, q, k, v, the attention
output, the FFN's hidden activations, ...) alive from the forward to the backward. Under
checkpointing the forward runs without recording anything and keeps only the layer's input;
the backward runs the layer's forward again, this time recording, and backpropagates
through that copy. Activation memory drops from L layers' worth to L inputs plus one layer's
worth at a time, for about one extra forward pass of compute.

This is torch.utils.checkpoint's "reentrant" design written out. Two details matter:

* The layer's trainable parameters are passed to the autograd Function as inputs. Otherwise,
  under LoRA, the first layer's input (the frozen embedding's output) does not require grad,
  the Function's output would not either, and that layer's adapters would silently get no
  gradient. Hugging Face works around the same trap with `enable_input_require_grads()`.
* The random state is saved and restored, so dropout drops the same units in the rebuilt
  forward as in the first one.

torch.utils.checkpoint itself imports torch's compiler stack on first use (over a second on
a small CPU); this file does not.
"""

from __future__ import annotations

import torch
from torch import nn


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: nn.Module, n_args: int, *inputs):
        args, params = inputs[:n_args], inputs[n_args:]
        ctx.layer, ctx.n_args, ctx.n_params = layer, n_args, len(params)
        ctx.devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda][:1]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.save_for_backward(*args)  # the only tensors kept: the layer's inputs
        with torch.no_grad():  # nothing recorded, so nothing saved inside the layer
            return layer(*args)

    @staticmethod
    def backward(ctx, grad_out):
        args = [a.detach().requires_grad_(a.requires_grad) for a in ctx.saved_tensors]
        with torch.random.fork_rng(devices=ctx.devices):
            torch.set_rng_state(ctx.cpu_rng)
            for device, state in zip(ctx.devices, ctx.cuda_rng):
                torch.cuda.set_rng_state(state, device)
            with torch.enable_grad():
                out = ctx.layer(*args)  # the forward again, recording this time
                # sum(out * grad_out) has gradient grad_out (times 1.0, exactly) with respect to
                # out; a scalar needs no grad_outputs, whose shape check imports sympy (0.4 s)
                scalar = (out * grad_out).sum()
        wanted = [a for a in args if a.requires_grad]
        params = [p for p in ctx.layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(scalar, wanted + params, allow_unused=True)
        arg_grads = iter(grads[:len(wanted)])
        return (None, None, *[next(arg_grads) if a.requires_grad else None for a in args],
                *grads[len(wanted):])


def checkpoint(layer: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """layer(*args), keeping only args for the backward, which reruns the layer.

    Positional tensor arguments only; the layer must return one tensor.
    """
    params = [p for p in layer.parameters() if p.requires_grad]
    return _Recompute.apply(layer, len(args), *args, *params)
