"""A 4-bit quantized weight as QLoRA stores it: packed codes plus per-block scales.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314.
A weight W of any shape is flattened, cut into blocks of n_b = 64 weights (the block size),
and stored as

    codes   ceil(numel / 2) bytes        two 4-bit codes per byte, the first in the high nibble
    absmax  numel / n_b float32 scales   or, double-quantized, 8-bit codes + a few float32

    W_hat = absmax[block] * levels[code]          (levels: NF4 by default)

so a parameter costs 4 + 32/64 = 4.5 bits, or 4 + 8/64 + 32/(64 * 256) = 4.127 bits with
double quantization. The layout matches bitsandbytes' quantize_4bit(quant_type="nf4"):
codes, scales and the dequantized tensor are bit-identical, double-quantized scales too
with dq_rounding="lut" (tests/test_nf4_parity.py).
bitsandbytes 0.50.2 can dequantize inside the matmul on a CUDA GPU (a fused kernel, for
inputs of few rows) and otherwise rebuilds the whole tensor too; here dequantize() always
rebuilds it, which is what a reader needs to see (benchmarks/nf4.py times it against
bitsandbytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from .blockwise import (FLOAT_DTYPES, _byte_table, check_levels, dequantize_packed,
                        pack_nibbles, quantize_blockwise, round_to_levels)
from .double_quant import DoubleQuantizedAbsmax, double_quantize
from .levels import fp4_levels, int4_levels, nf4_levels
from .sizes import check_block_size


def _table_name(levels: torch.Tensor) -> str:
    for name, table in (("NF4", nf4_levels()), ("INT4", int4_levels()), ("FP4", fp4_levels())):
        if torch.equal(levels.cpu(), table):
            return name
    return "custom 4-bit"


@dataclass(eq=False)  # tensors inside: == would compare them elementwise
class QuantizedTensor:
    """Packed 4-bit codes, per-block scales and what is needed to rebuild the tensor."""

    codes: torch.Tensor  # [ceil(numel / 2)] uint8, two codes per byte, first in the high nibble
    absmax: Union[torch.Tensor, DoubleQuantizedAbsmax]  # [n_blocks] float32, or its 8-bit form
    shape: torch.Size  # of the original tensor
    dtype: torch.dtype  # of the original tensor; dequantize() returns it by default
    block_size: int = 64  # weights per absmax scale; QLoRA uses 64
    levels: torch.Tensor = None  # [16] float32 code table, NF4 when None

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.levels is None:
            self.levels = nf4_levels()
        self._levels_checked = None  # (levels, its version) once check_levels has passed them
        self._tables = {}  # device -> _byte_table(levels) there, made on first dequantize
        self._check()

    def numel(self) -> int:
        """Number of weights, as torch.Tensor.numel()."""
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel() // self.block_size)

    @property
    def double_quant(self) -> bool:
        return isinstance(self.absmax, DoubleQuantizedAbsmax)

    def _check(self) -> None:
        """Raise if the parts do not fit together (run again by dequantize, after any edit).

        Only types, dtypes and shapes of codes and scales are read, never their values, so
        it costs a few microseconds and does not wait for the GPU. The levels' values are checked once,
        and again only if levels is replaced or edited in place (which bumps its version).
        """
        check_block_size(self.block_size)
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        seen = getattr(self, "_levels_checked", None)
        if seen is None or seen[0] is not self.levels or seen[1] != self.levels._version:
            levels = check_levels(self.levels)
            if levels.numel() != 16:
                raise ValueError(f"a 4-bit code table has 16 levels, got {levels.numel()}")
            self._levels_checked = (self.levels, self.levels._version)
            self._tables = {}  # made from the old levels
        if not isinstance(self.codes, torch.Tensor) or self.codes.dtype != torch.uint8:
            got = self.codes.dtype if isinstance(self.codes, torch.Tensor) else type(self.codes).__name__
            raise TypeError(f"codes must be a uint8 tensor (two 4-bit codes per byte), got {got}; "
                            "re-quantize the weight instead of converting the codes")
        if self.codes.shape != ((self.numel() + 1) // 2,):
            raise ValueError(f"codes must have shape ({(self.numel() + 1) // 2},) for {self.numel()} weights, "
                             f"got {tuple(self.codes.shape)}")
        if self.double_quant:
            n_scales = got = self.absmax.numel()
        else:
            if not isinstance(self.absmax, torch.Tensor) or self.absmax.dtype != torch.float32:
                raise TypeError("absmax must be a float32 tensor (one scale per block) or a DoubleQuantizedAbsmax")
            n_scales = self.absmax.numel() if self.absmax.dim() == 1 else None
            got = tuple(self.absmax.shape)
        if n_scales != self.n_blocks:
            raise ValueError(f"absmax must hold one scale per block, shape ({self.n_blocks},) for {self.numel()} "
                             f"weights in blocks of {self.block_size}; got {got}. Re-quantize instead of "
                             "editing the scales")

    def _table_on(self, device: torch.device) -> torch.Tensor:
        """_byte_table(levels) on device, [256, 2], kept so a call neither rebuilds nor hashes it."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = _byte_table(tuple(self.levels.tolist()), device)
        return table

    def dequantize(self, dtype: torch.dtype = None, compiled: Union[bool, str] = False) -> torch.Tensor:
        """W_hat in the original shape, computed in float32, returned as dtype (default: the original).

        The arithmetic is unpack_nibbles, then dequantize_blockwise; dequantize_packed does
        the same faster, straight from the bytes. compiled=True uses its torch.compile'd
        kernel (compiled on first use, seconds); compiled="triton", on a GPU, its
        hand-written Triton kernel, with less overhead per call; compiled="cpp", on the CPU, its
        hand-written C++ kernel (built on first use, about a minute). The result is the same to the bit.
        """
        self._check()
        dtype = self.dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dequantize to float32, float16 or bfloat16, got {dtype}")
        scales = self.absmax.dequantize() if self.double_quant else self.absmax  # [n_blocks] float32
        # the float32 product rounds once, to dtype, as in bitsandbytes
        w = dequantize_packed(self.codes, scales, self.levels, self.block_size, self.numel(), dtype, compiled,
                              self._table_on(self.codes.device))
        return w.view(self.shape)  # [numel] -> the original shape

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes plus scales (the shared 16-entry table is not counted)."""
        scale_bytes = self.absmax.nbytes if self.double_quant else 4 * self.absmax.numel()
        return self.codes.numel() + scale_bytes

    def __repr__(self) -> str:
        scales = f"double-quantized (8-bit, block {self.absmax.block_size})" if self.double_quant else "float32"
        bits = 8 * self.nbytes / self.numel()
        return (f"QuantizedTensor({_table_name(self.levels)}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"block_size={self.block_size}, absmax={scales}, {self.nbytes:,} bytes = {bits:.3f} bits/param)")


def quantize_4bit(w: torch.Tensor, levels: torch.Tensor, block_size: int = 64, double_quant: bool = False,
                  dq_block_size: int = 256, dq_rounding: str = "nearest") -> QuantizedTensor:
    """Blockwise 4-bit quantization of w with any 16-level table (NF4, INT4, FP4, ...)."""
    levels = check_levels(levels)
    if levels.numel() != 16:
        raise ValueError(f"a 4-bit code table has 16 levels, got {levels.numel()}")
    codes, absmax = quantize_blockwise(w, levels, block_size)  # [numel] int32, [n_blocks] float32
    # an odd count is padded with the code of 0.0, as bitsandbytes does
    zero_code = int(round_to_levels(torch.zeros(1, device=levels.device), levels))
    packed = pack_nibbles(codes, zero_code)  # [ceil(numel / 2)] uint8
    if double_quant:
        absmax = double_quantize(absmax, dq_block_size, dq_rounding)
    return QuantizedTensor(packed, absmax, w.shape, w.dtype, block_size, levels)


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = False, dq_block_size: int = 256,
                 dq_rounding: str = "nearest") -> QuantizedTensor:
    """NF4 quantization as in QLoRA; dq_rounding="lut" matches bitsandbytes' CPU kernel byte for byte."""
    return quantize_4bit(w, nf4_levels(), block_size, double_quant, dq_block_size, dq_rounding)
