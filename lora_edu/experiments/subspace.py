"""What an update looks like: its singular spectrum, and how much two updates share.

Hu et al. 2021 (LoRA, arXiv 2106.09685, section 7) ask whether the weight change of
fine-tuning is low rank, and whether adapters of different rank learn the same directions.
Their measure of how much of one subspace lies in another, for orthonormal bases
U_a [d, i] and U_b [d, j] of two updates' top singular directions, is

    phi(a, b, i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j)      in [0, 1]

1 when the smaller subspace lies inside the larger, and about max(i, j) / d for two random
subspaces of a d-dimensional space (the expected share of a random direction that falls in a
j-dimensional subspace is j / d).
"""

from __future__ import annotations

import torch


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of an update [out, in], largest first, float64."""
    if delta.dim() != 2:
        raise ValueError(f"an update is a matrix [out, in], got shape {tuple(delta.shape)}")
    return torch.linalg.svdvals(delta.double())


def _power(values) -> torch.Tensor:
    """sigma^2 of singular values (a tensor or a list, largest first), checked to be non-zero."""
    power = torch.as_tensor(values, dtype=torch.float64).square()
    if power.sum() == 0:
        raise ValueError("the update is zero: it has no singular directions to share")
    return power


def top_k_share(values, k: int) -> float:
    """Share of sum(sigma^2) in the top k of these singular values (largest first)."""
    power = _power(values)
    if not 1 <= k <= power.numel():
        raise ValueError(f"k must be between 1 and min(out, in) = {power.numel()}, got {k}")
    return (power[:k].sum() / power.sum()).item()


def rank_for_share(values, share: float = 0.9) -> int:
    """The fewest top singular directions that hold `share` of sum(sigma^2)."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    power = _power(values)
    cumulative = power.cumsum(0) / power.sum()
    return int((cumulative < share * (1 - 1e-12)).sum().item()) + 1


def energy_share(delta: torch.Tensor, k: int) -> float:
    """Share of ||dW||_F^2 that the best rank-k approximation keeps: sum of the top k sigma^2 over all."""
    return top_k_share(singular_values(delta), k)


def top_directions(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k left singular vectors of dW [out, in]: an orthonormal basis [out, k] of its output space."""
    if not 1 <= k <= min(delta.shape):
        raise ValueError(f"k must be between 1 and min(out, in) = {min(delta.shape)}, got {k}")
    u, _, _ = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :k]


def subspace_similarity(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """phi(i, j) for every i <= columns of u_a and j <= columns of u_b: a [i_max, j_max] table.

    u_a [d, i_max] and u_b [d, j_max] hold orthonormal columns, most important first (as
    top_directions returns them). Entry [i - 1, j - 1] is ||u_a[:, :i]^T u_b[:, :j]||_F^2 / min(i, j).
    """
    if u_a.dim() != 2 or u_b.dim() != 2 or u_a.shape[0] != u_b.shape[0]:
        raise ValueError(f"u_a and u_b must be [d, i] and [d, j] with the same d, got "
                         f"{tuple(u_a.shape)} and {tuple(u_b.shape)}")
    overlap = (u_a.double().T @ u_b.double()).square()  # [i_max, j_max], squared cosines
    cumulative = overlap.cumsum(0).cumsum(1)  # [i, j]: sum over the first i rows and j columns
    i = torch.arange(1, u_a.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u_b.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)
