"""Adam written out, the optimizer whose two moments cost 8 bytes per trained parameter.

Kingma and Ba 2014, "Adam: A Method for Stochastic Optimization", arXiv 1412.6980, with the
decoupled weight decay of AdamW (Loshchilov and Hutter 2017, "Decoupled Weight Decay
Regularization", arXiv 1711.05101). Per parameter p with gradient g, at step t (starting
from m = v = 0), with its group's lr and weight decay wd:

    p <- p * (1 - lr * wd)          decay, applied to p itself, outside the Adam ratio (AdamW)
    m <- b1 m + (1 - b1) g          first moment (a running mean of g)
    v <- b2 v + (1 - b2) g * g      second moment (a running mean of g squared)
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

wd = 0 (the default) is plain Adam. Parameter groups are torch's: pass dicts
{"params": [...], "lr": ..., "weight_decay": ...} instead of tensors, and a group's missing
keys take the constructor's values; LoRA+ (lora_edu.train.loraplus) gives B its own lr so.

master_weights=True is the mixed-precision recipe of Micikevicius et al. 2017, arXiv
1710.03740: for each bf16/fp16 parameter the optimizer keeps a float32 master copy, takes
the step there (gradient upcast to float32, float32 m and v), and copies the result back
rounded to the parameter's dtype. That is where "16 bytes per parameter" comes from:
2 (weight) + 2 (gradient) + 4 (master) + 4 (m) + 4 (v).

The operations follow the single-tensor path of torch.optim.Adam and AdamW (the one they
take for CPU tensors), so the result is bit-identical to them; the tests check that. It
exists because it is short enough to read, and because constructing any torch.optim
optimizer imports torch's compiler stack, over a second on a small CPU, which a chapter of
tiny experiments should not pay.
"""

from __future__ import annotations

import math

import torch

GROUP_KEYS = ("params", "lr", "weight_decay", "name")  # betas and eps are shared; "name" is a label


def make_param_groups(params, lr: float, weight_decay: float) -> list[dict]:
    """torch-style groups [{"params": [tensors], "lr", "weight_decay"}], each checked.

    params: an iterable of tensors (one group) or of dicts with "params" and, optionally,
    "lr" and "weight_decay" (the defaults fill them in) and a "name" (kept, for printing).
    Raises on an empty list or group, a tensor in two places, an unknown key, lr <= 0 or a
    negative weight decay.
    """
    if isinstance(params, torch.Tensor):
        raise TypeError("Adam takes an iterable of parameters (or of parameter-group dicts), got one tensor; "
                        "wrap it in a list: Adam([p])")
    items = list(params)
    if not items:
        raise ValueError("Adam got an empty parameter list; pass the parameters to train, "
                         "e.g. [p for p in model.parameters() if p.requires_grad]")
    n_dicts = sum(isinstance(item, dict) for item in items)
    if 0 < n_dicts < len(items):
        raise TypeError("Adam got a list mixing tensors and parameter-group dicts; put the loose tensors "
                        "in a group of their own: {'params': [...]}")
    groups, seen = [], {}  # seen: id(p) -> the group it is in
    for i, group in enumerate(items if n_dicts else [{"params": items}]):
        unknown = set(group) - set(GROUP_KEYS)
        if "params" not in group or unknown:
            raise ValueError(f"parameter group {i} has keys {sorted(group)}; a group takes 'params' and, "
                             f"optionally, 'lr', 'weight_decay' and 'name' (betas and eps are set for all groups)")
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        if not ps:
            raise ValueError(f"parameter group {i} is empty; leave it out of the list")
        for p in ps:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter group {i} holds a {type(p).__name__}; it takes tensors only")
            if id(p) in seen:  # it would be stepped twice per step
                where = "twice in that group" if seen[id(p)] == i else f"in group {seen[id(p)]} as well"
                raise ValueError(f"a parameter of shape {tuple(p.shape)} in group {i} is {where}; "
                                 "give each parameter to one group only, once")
            seen[id(p)] = i
        g_lr, g_wd = group.get("lr", lr), group.get("weight_decay", weight_decay)
        if not g_lr > 0:
            raise ValueError(f"Adam needs lr > 0; parameter group {i} has lr={g_lr}")
        if not g_wd >= 0:
            raise ValueError(f"Adam needs weight_decay >= 0 (0: no decay); parameter group {i} has {g_wd}")
        groups.append({**group, "params": ps, "lr": g_lr, "weight_decay": g_wd})
    return groups


class Adam:
    """Adam (AdamW when weight_decay > 0) without amsgrad, with torch.optim.Adam's defaults.

    `param_groups` can be edited between steps (a schedule changing group["lr"]), as torch's can.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, master_weights: bool = False):
        if not lr > 0 or not eps > 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam needs lr > 0, eps > 0 and betas in [0, 1); got lr={lr}, betas={betas}, eps={eps}")
        self.param_groups = make_param_groups(params, lr, weight_decay)
        self.params = [p for group in self.param_groups for p in group["params"]]
        self.betas, self.eps = tuple(betas), eps
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
        v_correction = math.sqrt(1 - b2 ** self.t)  # bias correction of v, under the root
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            step_size = lr / (1 - b1 ** self.t)  # bias correction of m
            for p in group["params"]:
                if p.grad is None:
                    continue
                m, v = self._fetch_state(p)
                w = self.master.get(id(p), p)  # [same shape as p], updated in place
                g = p.grad if w is p else p.grad.float()
                if wd != 0:
                    w.mul_(1 - lr * wd)  # decoupled: the decay never passes through m and v
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                w.addcdiv_(m, (v.sqrt() / v_correction).add_(self.eps), value=-step_size)
                if w is not p:
                    p.copy_(w)  # rounded once to p's 16-bit dtype
                self._store_state(p, m, v)
