"""Shared fixtures-as-functions for the lora_edu tests: a tiny transformer-shaped model.

TinyModel has the nested names real checkpoints have ("layers.0.attn.q_proj"), a decoy
layer whose name merely contains a target ("qq_proj"), Linear layers of several shapes,
with or without bias, and a frozen-by-injection nn.Embedding and nn.LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn

DIM, VOCAB, N_LAYERS = 16, 11, 2


class Attention(nn.Module):
    """Not real attention: just four Linear layers whose outputs all reach the result."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=bias)       # [dim, dim]
        self.qq_proj = nn.Linear(dim, dim, bias=bias)      # decoy: "q_proj" must not match it
        self.v_proj = nn.Linear(dim, dim // 2, bias=bias)  # [dim/2, dim], a non-square target
        self.o_proj = nn.Linear(dim // 2, dim, bias=bias)  # [dim, dim/2]

    def forward(self, x):
        gate = torch.sigmoid(self.qq_proj(x))
        return torch.tanh(self.q_proj(x)) * gate + self.o_proj(self.v_proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, bias)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, 2 * dim, bias=bias))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(2 * dim, dim, bias=bias))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class TinyModel(nn.Module):
    """token ids [batch, seq] -> logits [batch, seq, vocab]."""

    def __init__(self, dim: int = DIM, vocab: int = VOCAB, n_layers: int = N_LAYERS, bias: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, bias) for _ in range(n_layers))
        self.head = nn.Linear(dim, vocab, bias=bias)

    def forward(self, ids):
        x = self.embed(ids)  # [batch, seq, dim]
        for block in self.layers:
            x = block(x)
        return self.head(x)  # [batch, seq, vocab]


class OneLayer(nn.Module):
    """One layer named `proj`, so PEFT can target it by name (target_modules=["proj"])."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def make_model(seed: int = 0, **kw) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(**kw)


def token_ids(seed: int = 1, batch: int = 3, seq: int = 5, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def names_ending_with(model: nn.Module, suffix: str) -> list[str]:
    """Linear layers whose last name component is `suffix`, found without lora_edu's matcher."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] == suffix]


def randomise_adapters_(model: nn.Module, seed: int = 7, std: float = 0.1) -> None:
    """Give every lora_* / magnitude parameter a random value, as if trained (B != 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("lora_A", "lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif leaf == "magnitude":
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: module types, flags, values."""
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "merged": [(n, getattr(m, "merged", None)) for n, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["merged"] == before["merged"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
