"""LoRA+: the B factor learns lambda times faster than A.

Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv
2402.12354. With one learning rate for both factors, feature learning in a wide model is
inefficient (their section 3: as the width n grows, A and B need lr's of different orders);
they set

    lr(B) = lambda * lr(A),    lambda ~ 2^4 = 16 for a start (their section 4)

That is nothing but parameter groups for the optimizer: A (and the rest) at lr, B at
lambda * lr. HF PEFT's `peft.optimizers.create_loraplus_optimizer` (from the authors' code)
makes four groups, in this order, and so do we (leaving out the empty ones):

    A          every trainable parameter not below, at lr
    embedding  the parameters of a LoRA layer on an nn.Embedding, at lr_embedding (1e-6)
    B          every parameter with "lora_B" in its name, at lambda * lr
    B, no decay   the B's named "...bias..." or inside an nn.LayerNorm: weight decay 0

One choice is ours, one_d_as_b. PEFT also sends every other trainable 1-D tensor to the B
group (`param.ndim == 1`): biases, norm gains, and DoRA's magnitude, which then learns 16x
faster. The paper's argument is about the two factors of B @ A only, and neither the
authors' README nor PEFT's docstring gives a reason for the 1-D rule (it predates DoRA in
PEFT); so by default a 1-D tensor is treated as what it is, a parameter that is not B, at
lr. one_d_as_b=True is PEFT's rule, and the tests check that it gives PEFT's groups.

Decay, as PEFT decides it: no weight decay for names containing "bias" and for the
parameters of nn.LayerNorm modules (transformers' ALL_LAYERNORM_LAYERS), so an RMSNorm's
gain is decayed. PEFT applies that test in its B group only; we apply it in every group,
which differs only for a tensor of 2 or more dimensions outside B that is named "bias" or
sits in a LayerNorm (with one_d_as_b=False, the 1-D biases and norms are in A, and should
not be decayed there either).
"""

from __future__ import annotations

import torch
from torch import nn

from .adam import Adam


def _no_decay(model: nn.Module) -> set[int]:
    """ids of the parameters inside an nn.LayerNorm (transformers' ALL_LAYERNORM_LAYERS): not decayed."""
    return {id(p) for name, m in model.named_modules() if name and isinstance(m, nn.LayerNorm)
            for p in m.parameters()}


def _role(model: nn.Module, name: str, p: torch.Tensor, one_d_as_b: bool) -> str:
    """"A", "embedding" or "B" for the trainable parameter `name` (see the module docstring)."""
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(getattr(parent, "base", None), nn.Embedding):  # an adapter layer wrapping an embedding
        return "embedding"
    if "lora_B" in name or (one_d_as_b and p.dim() == 1):
        return "B"
    return "A"


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16, weight_decay: float = 0.0,
                          lr_embedding: float = 1e-6, one_d_as_b: bool = False) -> list[dict]:
    """Parameter groups for LoRA+: B at ratio * lr, the rest at lr (see the module docstring).

    Returns torch-style groups [{"params", "lr", "weight_decay", "name"}], the empty ones
    left out, for lora_edu.Adam or any torch.optim optimizer. Only trainable parameters go in.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"loraplus_param_groups takes the model (an nn.Module), got {type(model).__name__}")
    for what, value in (("lr", lr), ("ratio", ratio), ("lr_embedding", lr_embedding)):
        if not value > 0:
            raise ValueError(f"LoRA+ needs {what} > 0, got {value}; the paper's ratio lr(B) / lr(A) is about 16")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0 (0: no decay), got {weight_decay}")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters; call inject_lora(model, ...) first")
    if not any("lora_B" in name for name, _ in trainable):
        raise ValueError("LoRA+ sets the lr of the LoRA B factors, and this model trains none (no parameter "
                         "named lora_B); inject LoRA or DoRA first, or use a plain Adam")
    rates = {"A": lr, "embedding": lr_embedding, "B": lr * ratio}
    no_decay = _no_decay(model)
    groups = {}  # (role, decays) -> group, filled in named_parameters order, as PEFT's
    for role in rates:
        for decays in (True, False):
            groups[role, decays] = {"params": [], "lr": rates[role], "weight_decay": weight_decay if decays else 0.0,
                                    "name": role if decays else f"{role}, no decay"}
    for name, p in trainable:
        decays = "bias" not in name and id(p) not in no_decay
        groups[_role(model, name, p, one_d_as_b), decays]["params"].append(p)
    return [group for group in groups.values() if group["params"]]


def loraplus_optimizer(model: nn.Module, lr: float, ratio: float = 16, weight_decay: float = 0.0,
                       lr_embedding: float = 1e-6, one_d_as_b: bool = False, **adam_kwargs) -> Adam:
    """lora_edu.Adam (AdamW when weight_decay > 0) over loraplus_param_groups(model, ...).

    adam_kwargs (betas, eps, master_weights) go to Adam. PEFT's equivalent, with
    one_d_as_b=True: create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr,
    loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay). Mind the keyword there:
    PEFT passes weight_decay=... on to AdamW as its default, which every group then
    overrides with loraplus_weight_decay (0.0 unless given), so it decays nothing.
    """
    groups = loraplus_param_groups(model, lr, ratio, weight_decay, lr_embedding, one_d_as_b)
    return Adam(groups, lr=lr, **adam_kwargs)
