"""How many bytes a 4-bit quantized tensor takes: codes, absmax scales, double quantization.

Dettmers et al. 2023, QLoRA (arXiv 2305.14314), section 3: with block size B the float32
absmax costs 32 / B bits per weight; double quantization stores it as an 8-bit code with one
float32 scale per B2 blocks, 8 / B + 32 / (B * B2) bits. Plain arithmetic, no torch: the
memory ledger runs where torch is not installed.
"""

from __future__ import annotations

import numbers


def check_block_size(block_size, name: str = "block_size") -> int:
    """Return block_size as an int, or raise if it is not a positive power of two."""
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"{name} must be a positive int that is a power of two (e.g. 64), "
                        f"got {block_size!r} of type {type(block_size).__name__}")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"{name} must be a positive power of two (32, 64, 128, ...), got {block_size}; "
                         f"QLoRA uses 64 for the weights and 256 for double quantization")
    return int(block_size)


def scale_bytes(numel: int, block_size: int = 64, double_quant: bool = False, dq_block_size: int = 256) -> int:
    """Exact bytes of the scales of one quantized tensor of numel weights (what .nbytes adds to the codes).

    One float32 absmax per block; with double quantization, one uint8 code per block plus
    one float32 absmax per dq_block_size blocks and the float32 offset.
    """
    n_blocks = -(-numel // block_size)  # the last block may be partial
    if not double_quant:
        return 4 * n_blocks
    return n_blocks + 4 * -(-n_blocks // dq_block_size) + 4


def bits_per_param(block_size: int = 64, double_quant: bool = False, dq_block_size: int = 256,
                   code_bits: int = 4, absmax_bits: int = 32, dq_code_bits: int = 8) -> float:
    """Storage bits per weight: 4 + 32/B, or 4 + 8/B + 32/(B * B2) with double quantization.

    The one float32 offset per tensor that double quantization adds is left out: it is
    32 bits for millions of weights.
    """
    block_size = check_block_size(block_size)
    if not double_quant:
        return code_bits + absmax_bits / block_size
    dq_block_size = check_block_size(dq_block_size, "dq_block_size")
    return code_bits + dq_code_bits / block_size + absmax_bits / (block_size * dq_block_size)
