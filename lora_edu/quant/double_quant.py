"""Double quantization: store the per-block absmax scales themselves in 8 bits.

Dettmers et al. 2023, "QLoRA", arXiv 2305.14314, section 3 (Double Quantization). The
8-bit code is the signed dynamic data type of Dettmers 2015, "8-Bit Approximations for
Parallelism in Deep Learning", arXiv 1511.04561. With c the float32 absmax of each
64-weight block:

    offset = mean(c)                        one float32 per tensor
    c - offset  -> blockwise 8-bit codes    blocks of 256 scales, one float32 absmax each
    c_hat = offset + absmax2[block] * dynamic[code]

Storage per weight drops from 32/64 = 0.5 bit to 8/64 + 32/(64 * 256) = 0.127 bit. The
scales are all positive and bunched together; subtracting their mean centres them on 0,
where the signed dynamic code is finest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise import (MIN_ABSMAX, check_finite, check_weight, dequantize_blockwise,
                        quantize_blockwise, to_blocks)
from .sizes import check_block_size

#: bitsandbytes' CPU kernel snaps w / c onto this many evenly spaced points of [-1, 1]
LUT_SIZE = 65536


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic code: 256 sorted float32 values in [-1, 1].

    Conceptually a byte is a sign bit, then E zero bits (E = 0..6) closed by a 1, then the
    remaining 6 - E bits as a fraction: the magnitude is 10^-E times the centre of one of
    2^(6-E) equal bins of [0.1, 1]. Large magnitudes get many fraction bits, small ones a
    large exponent: 64 + 32 + ... + 1 = 127 magnitudes per sign, from 5.5e-7 to 0.993, and
    the two patterns with no 1 after the sign are spent on 0 and 1. Seven decades in 8 bits
    suit values spread over orders of magnitude, such as centred absmax scales. As with the
    4-bit tables, the stored code is the index into this sorted table, not the bit pattern.
    """
    magnitudes = []
    for fraction_bits in range(7):  # 7 groups of values, not a loop over data
        edges = torch.linspace(0.1, 1.0, 2 ** fraction_bits + 1)  # float32, as in bitsandbytes
        centres = (edges[:-1] + edges[1:]) / 2  # [2^fraction_bits] bin centres in [0.1, 1]
        magnitudes.append(10.0 ** (fraction_bits - 6) * centres)  # float32, E = 6 - fraction_bits
    pos = torch.cat(magnitudes)  # [127]
    return torch.cat([-pos, torch.tensor([0.0, 1.0]), pos]).sort().values  # [256]


def _lut_round(blocks: torch.Tensor, code: torch.Tensor):
    """bitsandbytes' CPU rounding: snap w / c to a 65536-point grid, then look up its code.

    A table lookup per value instead of a search: fast, and exact wherever the code is
    coarser than the grid. Every step below mirrors the kernel's float32 arithmetic.
    """
    grid = (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32, device=blocks.device)) / (LUT_SIZE - 1) - 1.0
    midpoints = (code[:-1] + code[1:]) / 2  # [255]
    table = torch.searchsorted(midpoints, grid, side="left")  # [65536]: nearest code of each point
    absmax = blocks.abs().amax(dim=1)  # [n_blocks]
    inverse = 1.0 / absmax.clamp(min=MIN_ABSMAX)  # [n_blocks]; zero blocks are overwritten below
    scaled = (blocks * inverse[:, None]).clamp(-1.0, 1.0)  # every block multiplies, ragged or not
    index = (((scaled + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).to(torch.int64)  # float32 steps, truncated
    codes = table[index]  # [n_blocks, B], the code nearest to the grid point nearest to w / c
    return torch.where(absmax[:, None] == 0, 0, codes), absmax  # the kernel writes code 0 for a zero block


@dataclass(eq=False)  # tensors inside: == would compare them elementwise
class DoubleQuantizedAbsmax:
    """Per-block scales stored as 8-bit codes around a float32 offset."""

    codes: torch.Tensor  # [n_scales] uint8, indices into `code`
    absmax: torch.Tensor  # [ceil(n_scales / block_size)] float32, one per block of scales
    offset: torch.Tensor  # [] float32, the mean of the scales
    block_size: int = 256
    code: torch.Tensor = None  # [256] float32, the dynamic map

    def __post_init__(self):
        if self.code is None:
            self.code = dynamic_map()
        self._check()

    def _check(self) -> None:
        check_block_size(self.block_size, "dq_block_size")
        if not isinstance(self.codes, torch.Tensor) or self.codes.dtype != torch.uint8:
            got = type(self.codes).__name__ if not isinstance(self.codes, torch.Tensor) else self.codes.dtype
            raise TypeError(f"double-quantized codes must be a uint8 tensor, got {got}; "
                            "they are indices into the 256-entry dynamic code")
        expected = -(-self.codes.numel() // self.block_size)
        a2 = self.absmax
        if not isinstance(a2, torch.Tensor) or a2.dtype != torch.float32 or a2.shape != (expected,):
            got = f"{a2.dtype} {tuple(a2.shape)}" if isinstance(a2, torch.Tensor) else type(a2).__name__
            raise ValueError(f"second-level absmax must be float32 of shape ({expected},) for {self.codes.numel()} "
                             f"scales in blocks of {self.block_size}, got {got}; re-quantize instead of editing it")

    def numel(self) -> int:
        return self.codes.numel()

    def dequantize(self) -> torch.Tensor:
        """The float32 scales back, [n_scales]: offset + absmax2[block] * dynamic[code]."""
        self._check()
        centred = dequantize_blockwise(self.codes, self.absmax, self.code, self.block_size)
        return centred + self.offset  # two roundings (multiply, then add), as bitsandbytes

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.absmax.numel() + 4  # codes, scales, offset

    def __repr__(self) -> str:
        return (f"DoubleQuantizedAbsmax({self.numel()} scales -> uint8 codes, {self.absmax.numel()} "
                f"float32 absmax (block {self.block_size}), offset={self.offset.item():.4g})")


def double_quantize(absmax: torch.Tensor, block_size: int = 256, rounding: str = "nearest"):
    """Quantize float32 scales to 8 bits around their mean; returns a DoubleQuantizedAbsmax.

    rounding="nearest" picks the nearest code (ties to the lower), the rule of the QLoRA
    paper and of bitsandbytes' pure-torch reference backend. rounding="lut" reproduces
    bitsandbytes' CPU kernel (0.50) byte for byte: it first snaps each scaled value to the
    nearest of 65536 evenly spaced points of [-1, 1] (steps of 3.1e-5), then takes the code
    nearest to that point. The result is off the nearest code by at most one grid step in
    value: a code now and then in the coarse top decades (0.2% of the scales of a normal
    weight), and routinely among the finest codes near 0, which the grid cannot resolve.
    A block of equal scales (centred to all zeros) gets code 0 there, as in the kernel.
    """
    check_weight(absmax, "absmax")
    check_finite(absmax, "absmax")
    if absmax.dim() != 1 or absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be a 1-D float32 tensor of per-block scales, got "
                         f"{absmax.dtype} {tuple(absmax.shape)}")
    block_size = check_block_size(block_size, "dq_block_size")
    code = dynamic_map().to(absmax.device)
    offset = absmax.mean()  # [], the same float32 reduction bitsandbytes runs
    centred = absmax - offset  # [n_scales], now spread around 0
    if rounding == "nearest":
        codes, scales = quantize_blockwise(centred, code, block_size)
    elif rounding == "lut":
        codes, scales = _lut_round(to_blocks(centred, block_size), code)
        codes = codes.view(-1)[: centred.numel()]
    else:
        raise ValueError(f'rounding must be "nearest" or "lut" (bitsandbytes\' CPU kernel), got {rounding!r}')
    return DoubleQuantizedAbsmax(codes.to(torch.uint8), scales, offset, block_size, code)
