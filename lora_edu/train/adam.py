"""Adam written out, the optimizer whose two moments cost 8 bytes per trained parameter.

Kingma and Ba 2014, "Adam: A Method for Stochastic Optimization", arXiv 1412.6980.
Per parameter p with gradient g, at step t (starting from m = v = 0):

    m <- b1 m + (1 - b1) g          first moment (a running mean of g)
    v <- b2 v + (1 - b2) g * g      second moment (a running mean of g squared)
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

master_weights=True is the mixed-precision recipe of Micikevicius et al. 2017, arXiv
1710.03740: for each bf16/fp16 parameter the optimizer keeps a float32 master copy, takes
the step there (gradient upcast to float32, float32 m and v), and copies the result back
rounded to the parameter's dtype. That is where "16 bytes per parameter" comes from:
2 (weight) + 2 (gradient) + 4 (master) + 4 (m) + 4 (v).

The operations follow torch.optim.Adam's single-tensor path (the one it takes for CPU
tensors), so the result is bit-identical to it; the tests check that. It exists because it is
short enough to read, and because constructing any torch.optim optimizer imports torch's
compiler stack, over a second on a small CPU, which a chapter of tiny experiments should
not pay.
"""

from __future__ import annotations

import math

import torch


class Adam:
    """Adam without weight decay or amsgrad, with torch.optim.Adam's defaults."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 master_weights: bool = False):
        self.params = list(params)
        if not self.params:
            raise ValueError("Adam got an empty parameter list; pass the parameters to train, "
                             "e.g. [p for p in model.parameters() if p.requires_grad]")
        if not lr > 0 or not eps > 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam needs lr > 0, eps > 0 and betas in [0, 1); got lr={lr}, betas={betas}, eps={eps}")
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.t = 0
        self.state = {}  # id(p) -> (m, v), created at the first step
        # id(p) -> float32 copy of a 16-bit p, the weight the steps really update
        self.master = {id(p): p.detach().float() for p in self.params
                       if master_weights and p.dtype != torch.float32}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _fetch_state(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) for p, on p's device; created as zeros at p's first step."""
        if id(p) not in self.state:
            w = self.master.get(id(p), p)  # float32 moments for a parameter with a master copy
            self.state[id(p)] = (torch.zeros_like(w), torch.zeros_like(w))
        return self.state[id(p)]

    def _store_state(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        """Called after p's update; plain Adam updated its state in place, nothing to do."""

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1 ** self.t)  # bias correction of m
        v_correction = math.sqrt(1 - b2 ** self.t)  # bias correction of v, under the root
        for p in self.params:
            if p.grad is None:
                continue
            m, v = self._fetch_state(p)
            w = self.master.get(id(p), p)  # [same shape as p], updated in place
            g = p.grad if w is p else p.grad.float()
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            w.addcdiv_(m, (v.sqrt() / v_correction).add_(self.eps), value=-step_size)
            if w is not p:
                p.copy_(w)  # rounded once to p's 16-bit dtype
            self._store_state(p, m, v)
