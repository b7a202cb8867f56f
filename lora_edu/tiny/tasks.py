"""A synthetic language with a "shift", so that fine-tuning has something real to learn.

Noisy modular counting. Each sequence picks a hidden step s from `task.steps` and a random
start token, then counts modulo the vocabulary:

    x[t+1] = (x[t] + s) mod V         with probability 1 - noise
    x[t+1] = uniform over V tokens    with probability noise

To predict well a model must read s off the context (attention: compare a token with the
one before it) and then add it (MLP). PRETRAIN uses steps (1, 2, 3); FINETUNE keeps 1 and 2
but swaps 3 for 5. A model pretrained on PRETRAIN already knows how to infer and add a step,
so it is a good but imperfect start on FINETUNE: it has never seen a step of 5. That gap is
what an adapter learns in a few hundred steps.

No model can beat `entropy_floor(task)`: even knowing s, the noise stays unpredictable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)  # frozen: hashable, so it can key pretrained_model's cache
class Task:
    vocab_size: int = 32  # V, tokens 0..V-1; must equal the model's vocab_size
    seq_len: int = 32  # tokens the model sees per sequence (a sample holds seq_len + 1)
    steps: tuple = (1, 2, 3)  # the hidden step s of a sequence is drawn uniformly from these
    noise: float = 0.1  # chance that a token is uniform noise instead of x[t] + s

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))  # a list would not be hashable
        if self.vocab_size < 2 or self.seq_len < 2:
            raise ValueError(f"Task needs vocab_size >= 2 and seq_len >= 2, got {self.vocab_size}, {self.seq_len}")
        if not self.steps or not all(isinstance(s, int) and 0 < s < self.vocab_size for s in self.steps):
            raise ValueError(f"steps must be a non-empty tuple of ints in [1, vocab_size), got {self.steps!r}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"noise must be a probability in [0, 1), got {self.noise!r}")


PRETRAIN = Task(steps=(1, 2, 3))  # rule P: what the base model is pretrained on
FINETUNE = Task(steps=(1, 2, 5))  # rule Q: the shifted task the adapters learn


def sample(task: Task, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """One batch of sequences, [batch_size, seq_len + 1] int64; inputs are [:, :-1], targets [:, 1:]."""
    V, T = task.vocab_size, task.seq_len + 1
    steps = torch.tensor(task.steps)
    s = steps[torch.randint(len(steps), (batch_size, 1), generator=generator)]  # [B, 1] hidden step
    start = torch.randint(V, (batch_size, 1), generator=generator)  # [B, 1]
    is_noise = torch.rand(batch_size, T, generator=generator) < task.noise  # [B, T]
    noise = torch.randint(V, (batch_size, T), generator=generator)  # [B, T]
    x = torch.empty(batch_size, T, dtype=torch.long)
    x[:, :1] = start
    for t in range(1, T):  # the rule, one position at a time: the next token follows the previous one
        x[:, t] = torch.where(is_noise[:, t], noise[:, t], (x[:, t - 1] + s[:, 0]) % V)
    return x


def make_batches(task: Task, n: int, seed: int, batch_size: int = 32) -> torch.Tensor:
    """n batches drawn from a torch.Generator seeded with `seed`: [n, batch_size, seq_len + 1].

    The same (task, n, seed, batch_size) gives the same tensor on every call and machine.
    """
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"make_batches needs n > 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
    g = torch.Generator().manual_seed(seed)
    return torch.stack([sample(task, batch_size, g) for _ in range(n)])  # [n, B, T + 1]


def entropy_floor(task: Task) -> float:
    """Mean loss (nats) of the ideal predictor that knows s: the entropy of the noise.

    The rule's token has probability 1 - noise + noise / V, each other token noise / V.
    (Slightly optimistic: a model must infer s from the first tokens of each sequence.)
    """
    V, e = task.vocab_size, task.noise
    p_rule, p_other = 1 - e + e / V, e / V
    return -(p_rule * math.log(p_rule) + ((V - 1) * p_other * math.log(p_other) if e > 0 else 0.0))
