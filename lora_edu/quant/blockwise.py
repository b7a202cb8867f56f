"""Blockwise absmax quantization: scale each block to [-1, 1], round to the nearest level.

Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861,
used for 4 bits in QLoRA (Dettmers et al. 2023, arXiv 2305.14314). The flattened tensor
is cut into blocks of n_b values (the block size); block b keeps one float32 scale
c_b = max |w| over the block, and each weight keeps one code:

    code_i = argmin_k | w_i / c_b - levels[k] |          (ties go to the lower level)
    w_hat_i = c_b * levels[code_i]

One outlier then only coarsens its own block of n_b weights, not the whole matrix. The
code table is a parameter (NF4, INT4 or FP4 from levels.py, or the 8-bit dynamic code of
double_quant.py). The arithmetic follows bitsandbytes' quantize_4bit step by step
(multiply by 1 / c_b, clamp to [-1, 1], search the midpoints of the sorted levels), so
the codes match it byte for byte. Everything is vectorised over blocks; no Python loop
over blocks (the eager CPU path walks cache-sized chunks of thousands of blocks).
dequantize_packed is the fast road back from the packed bytes (one table lookup per byte,
optionally one torch.compile'd pass, or a hand-written kernel: Triton on a GPU,
csrc/nf4_dequantize.cpp on the CPU); it returns the same bits as the plain
dequantize_blockwise(unpack_nibbles(...)).
"""

from __future__ import annotations

import functools
import platform
import sys

import torch
import torch.nn.functional as F

from .sizes import check_block_size

#: input dtypes accepted; the arithmetic always runs in float32, as in bitsandbytes
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: bitsandbytes clamps the scale from below before taking 1 / c_b, so an all-zero block
#: scales by 1e38 instead of dividing by zero; its codes all mean 0
MIN_ABSMAX = 1e-38


def check_weight(w, name: str = "w") -> None:
    """Raise if w is not a non-empty float32/float16/bfloat16 tensor (finiteness: check_finite)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {w.dtype}; "
                        f"convert it first, e.g. {name}.float()")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty; there is nothing to quantize")


def check_finite(absmax: torch.Tensor, name: str = "w") -> None:
    """Raise if a block holds NaN or inf; its absmax shows it (amax propagates both)."""
    if not torch.isfinite(absmax).all():
        what = "NaN" if torch.isnan(absmax).any() else "inf"
        raise ValueError(f"{name} contains {what}: it would become its block's absmax and wipe out "
                         f"the block; find it with (~torch.isfinite({name})).nonzero()")


def check_levels(levels) -> torch.Tensor:
    """Return the code table as float32, or raise if it is not sorted and inside [-1, 1]."""
    if not isinstance(levels, torch.Tensor) or levels.dim() != 1 or not levels.is_floating_point():
        raise TypeError("levels must be a 1-D float tensor, e.g. nf4_levels()")
    levels = levels.float()
    if levels.numel() < 2 or (levels[1:] < levels[:-1]).any() or levels.abs().max() > 1:
        raise ValueError("levels must hold at least 2 values in [-1, 1], sorted ascending; "
                         "rounding searches the midpoints between neighbours")
    return levels


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten to float32 and zero-pad to whole blocks: [n_blocks, block_size]."""
    x = x.detach().reshape(-1).float()  # [n]
    pad = -x.numel() % block_size  # zeros change no block's absmax
    return F.pad(x, (0, pad)).view(-1, block_size)  # [n_blocks, block_size]


def scale_blocks(blocks: torch.Tensor, numel: int):
    """Divide each block by its absmax and clamp to [-1, 1]; return (scaled, absmax [n_blocks])."""
    absmax = blocks.abs().amax(dim=1)  # [n_blocks], c_b, stored unclamped (full blocks)
    safe = absmax.clamp(min=MIN_ABSMAX)  # [n_blocks]
    scaled = blocks * (1.0 / safe)[:, None]  # [n_blocks, block_size]
    if numel % blocks.shape[1]:
        # bitsandbytes divides the ragged last block by c_b instead of multiplying by
        # 1 / c_b; the two can differ in the last bit and flip a value sitting on a
        # midpoint, so do the same to keep every code identical.
        scaled[-1] = blocks[-1] / safe[-1]
        # It also stores that block's scale clamped (1e-38 for an all-zero ragged block),
        # the full blocks' unclamped; store the same (tests/test_properties_nf4.py).
        absmax[-1] = safe[-1]
    return scaled.clamp_(-1.0, 1.0), absmax


def round_to_levels(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each value in [-1, 1], ties to the lower level (int32)."""
    midpoints = (levels[:-1] + levels[1:]) / 2  # [L-1], sorted because levels are
    # bucketize finds i with midpoints[i-1] < x <= midpoints[i]: x below midpoint i picks
    # level i, and x exactly on it also picks level i, the lower neighbour.
    return torch.bucketize(scaled, midpoints, out_int32=True)


def quantize_blockwise(w: torch.Tensor, levels: torch.Tensor, block_size: int):
    """Codes [n] (int32, indices into levels) and absmax [n_blocks] (float32) of w."""
    check_weight(w)
    block_size = check_block_size(block_size)
    levels = check_levels(levels).to(w.device)
    scaled, absmax = scale_blocks(to_blocks(w, block_size), w.numel())  # [n_blocks, n_b], [n_blocks]
    check_finite(absmax)  # on n_blocks scales, cheaper than a pass over every weight
    codes = round_to_levels(scaled, levels).view(-1)[: w.numel()]  # [n], padding dropped
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                         block_size: int) -> torch.Tensor:
    """w_hat = absmax[block] * levels[code], flat float32 [n]."""
    n = codes.numel()
    values = levels[codes.long()]  # [n], each in [-1, 1]
    if n % block_size:  # (padding copies the tensor, so only when there is a ragged block)
        values = F.pad(values, (0, -n % block_size))
    values = values.view(-1, block_size)  # [n_blocks, n_b]
    # An all-zero block has absmax 0 (or 1e-38, if it is the ragged last one) and code 0.0,
    # so it reads back as zeros, not NaN.
    return (values * absmax[:, None]).view(-1)[:n]  # [n]


def pack_nibbles(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble: [ceil(n / 2)] uint8."""
    codes = codes.to(torch.uint8)  # [n], each < 16
    if codes.numel() % 2:  # an odd count borrows one padding code (bitsandbytes pads with 0.0's)
        codes = torch.cat([codes, codes.new_tensor([pad_code])])
    return (codes[0::2] << 4) | codes[1::2]  # [ceil(n / 2)]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: [n] codes in 0..15 (uint8)."""
    pairs = torch.stack([packed >> 4, packed & 0x0F], dim=1)  # [n_bytes, 2]: (high, low)
    return pairs.view(-1)[:n]  # [n], the padding nibble dropped


@functools.lru_cache(maxsize=16)
def _byte_table(levels: tuple, device: torch.device) -> torch.Tensor:
    """The pair of levels that each packed byte stands for: [256, 2] float32, made once per device.

    Row b is (levels[b >> 4], levels[b & 15]), the first code in the high nibble, so one
    lookup per byte replaces unpacking two codes and looking each one up.
    """
    lv = torch.tensor(levels, dtype=torch.float32, device=device)  # [16]
    byte = torch.arange(256, device=device)  # [256], every value of a byte
    return torch.stack([lv[byte >> 4], lv[byte & 0x0F]], dim=1)  # [256, 2]: (high, low)


def _dequantize_fused(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """The definition for torch.compile, which fuses it into one pass: bytes in, weights out."""
    values = table[packed.int()].flatten(1)  # [n_blocks, n_b/2] bytes -> [n_blocks, n_b/2, 2] -> [n_blocks, n_b]
    return (values * absmax[:, None]).to(dtype)  # [n_blocks, n_b]


_compiled_dequantize = None  # torch.compile(_dequantize_fused), made on first use
_mark_dynamic = None  # torch._dynamo.maybe_mark_dynamic, imported on first use
_triton_kernel = None  # the Triton kernel of _make_triton_kernel, made on first use
_cpp_kernel = None  # the extension module built from csrc/nf4_dequantize.cpp, on first use
tl = None  # triton.language, imported with it
TRITON_BYTES = 1024  # packed bytes (2048 weights) per Triton program
CHUNK_BYTES = 1 << 18  # packed bytes per pass of the eager path (1 MiB of int32 indices)


def _make_triton_kernel():
    """One Triton program per TRITON_BYTES packed bytes: read each byte once, write two weights.

    Written by hand and launched directly, so a call costs one kernel launch and none of
    torch.compile's guard checks (tens of microseconds, as long as the kernel itself on a
    16M-weight matrix). Only this path imports triton.
    """
    global tl  # triton compiles the kernel's source and looks its names up in this module
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_kernel(packed_ptr, absmax_ptr, table_ptr, out_ptr, n_bytes,
                          HALF_BLOCK: tl.constexpr, BYTES: tl.constexpr):
        first = tl.program_id(0).to(tl.int64) * BYTES  # (int64: no overflow past 2**31 weights)
        i = first + tl.arange(0, BYTES)  # [BYTES] byte indices
        byte = tl.load(packed_ptr + i, mask=i < n_bytes, other=0).to(tl.int32)  # [BYTES]
        scale = tl.load(absmax_ptr + i // HALF_BLOCK, mask=i < n_bytes, other=0.0)  # [BYTES] c_b
        high = tl.load(table_ptr + 2 * byte) * scale  # [BYTES] first weight, float32 product
        low = tl.load(table_ptr + 2 * byte + 1) * scale  # [BYTES] second weight
        pair = tl.reshape(tl.join(high, low), (2 * BYTES,))  # [BYTES, 2] -> [2 * BYTES], interleaved
        j = 2 * first + tl.arange(0, 2 * BYTES)  # [2 * BYTES] weight indices
        tl.store(out_ptr + j, pair.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),  # rounded once,
                 mask=j < 2 * n_bytes)  # to nearest even, as torch does

    return dequantize_kernel, triton.cdiv


def _dequantize_triton(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block_size: int,
                       n: int, dtype: torch.dtype) -> torch.Tensor:
    """Launch the Triton kernel on CUDA tensors: flat [n] weights of dtype."""
    global _triton_kernel
    if packed.device.type != "cuda":
        raise ValueError(f'compiled="triton" runs on CUDA tensors only, got {packed.device}; '
                         "use compiled=True (torch.compile) on other devices")
    if _triton_kernel is None:
        _triton_kernel = _make_triton_kernel()
    kernel, cdiv = _triton_kernel
    out = torch.empty(n, dtype=dtype, device=packed.device)
    n_bytes = packed.numel()  # n / 2
    kernel[(cdiv(n_bytes, TRITON_BYTES),)](packed, absmax, table, out, n_bytes,
                                           HALF_BLOCK=block_size // 2, BYTES=TRITON_BYTES)
    return out  # [n]


def _load_cpp_kernel():
    """Compile (once per machine, about a minute) and import csrc/nf4_dequantize.cpp."""
    global _cpp_kernel
    if _cpp_kernel is None:
        import os

        from torch.utils import cpp_extension

        source = os.path.join(os.path.dirname(__file__), "csrc", "nf4_dequantize.cpp")
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []  # (Apple's clang has no OpenMP)
        # built for this machine's vector units (AVX-512 where there is one): the build is per machine anyway
        native = ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else []
        print("lora_edu: building the C++ NF4 kernel (about a minute, once per machine)...", file=sys.stderr)
        try:
            _cpp_kernel = cpp_extension.load("lora_edu_nf4_dequantize", [source],
                                             extra_cflags=["-O3", *native, *openmp], extra_ldflags=openmp)
        except Exception as error:  # no compiler, no ninja, no Python headers, ...
            raise RuntimeError(f'compiled="cpp" builds a C++ kernel with torch.utils.cpp_extension, which failed '
                               f"({type(error).__name__}: {str(error)[:300]}); it needs a C++ compiler, ninja and "
                               "Python's headers. compiled=True (torch.compile) or the default eager path give "
                               "the same bits.") from error
    return _cpp_kernel


def _dequantize_cpp(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Run the C++ kernel on CPU tensors: flat [n] weights of dtype, from whole blocks."""
    if packed.device.type != "cpu":
        raise ValueError(f'compiled="cpp" runs on CPU tensors only, got {packed.device}; '
                         'use compiled="triton" on a CUDA GPU')
    return _load_cpp_kernel().dequantize(packed.contiguous().view(-1), absmax.float().contiguous(),
                                         table.contiguous(), block_size, dtype)


def dequantize_packed(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, block_size: int,
                      n: int, dtype: torch.dtype = torch.float32, compiled: bool | str = False,
                      table: torch.Tensor = None) -> torch.Tensor:
    """w_hat = absmax[block] * levels[code] from the packed bytes, flat [n], rounded once to dtype.

    Bit for bit dequantize_blockwise(unpack_nibbles(packed, n), ...).to(dtype), in fewer
    passes: one lookup per byte in _byte_table, then the scales, chunk by chunk while the
    chunk is in cache, straight into an output allocated once. compiled=True runs _dequantize_fused through
    torch.compile instead: one generated C++ or Triton kernel reads each byte once and
    writes each weight once. The first call compiles it (seconds, again for a new dtype,
    block size or device; past torch's recompile limit of 8 it runs eagerly, with the same
    result) and imports torch._dynamo, which lora_edu otherwise never does.
    compiled="triton" (CUDA only) launches the hand-written kernel of _make_triton_kernel,
    the same arithmetic without torch.compile's per-call guards; compiled="cpp" (CPU only)
    runs its C++ counterpart, csrc/nf4_dequantize.cpp, compiled on first use. A ragged last block takes
    the plain route, and so do blocks of one weight. table, if given, is
    _byte_table(levels) on packed's device, cached by the caller (QuantizedTensor does).
    """
    if compiled not in (False, True, "triton", "cpp"):
        raise ValueError(f'compiled must be False, True, "triton" (CUDA) or "cpp" (CPU), got {compiled!r}')
    device = packed.device
    if n % block_size or block_size == 1:  # (whole blocks of two or more weights are whole bytes)
        values = dequantize_blockwise(unpack_nibbles(packed, n), absmax, levels.to(device), block_size)
        return values.to(dtype)  # [n]
    if table is None:
        table = _byte_table(tuple(levels.tolist()), device)  # [256, 2]
    if compiled == "triton":
        return _dequantize_triton(packed, absmax, table, block_size, n, dtype)
    if compiled == "cpp":
        return _dequantize_cpp(packed, absmax, table, block_size, dtype)
    if compiled:
        global _compiled_dequantize, _mark_dynamic
        if _compiled_dequantize is None:
            _compiled_dequantize = torch.compile(_dequantize_fused)
            from torch._dynamo import maybe_mark_dynamic as _mark_dynamic  # (torch.compile imported it)
        blocks = packed.view(-1, block_size // 2)  # [n_blocks, n_b/2] bytes
        # one kernel for any number of blocks, so weights of other shapes don't recompile it;
        # it is compiled once per block size, dtype and device
        _mark_dynamic(blocks, 0)
        _mark_dynamic(absmax, 0)
        return _compiled_dequantize(blocks, absmax, table, dtype).view(-1)  # [n]
    out = torch.empty(n, dtype=dtype, device=device)
    # A table row is 8 bytes; viewed as one int64, index_select copies it as one element
    # (a float32 [256, 2] table would be copied row by row, about half as fast).
    rows = table.view(torch.int64).view(-1)  # [256]
    # On the CPU the bytes go through in chunks, so that the int32 indices and float32 pairs of a chunk
    # stay in the cache between the three steps instead of making round trips through
    # memory (measured on a 2-core EPYC: 51 -> 38 ms for a 4096 x 4096 fp32 weight).
    # A chunk is whole blocks: CHUNK_BYTES and block_size are both powers of two.
    n_bytes = packed.numel()  # n / 2
    chunk = min(max(CHUNK_BYTES, block_size // 2), n_bytes) if device.type == "cpu" else n_bytes  # (a GPU
    # has no such cache to keep, and each chunk would cost three more kernel launches)
    index = torch.empty(chunk, dtype=torch.int32, device=device)  # scratch, reused by each chunk
    pairs = torch.empty(chunk, dtype=torch.int64, device=device) if dtype != torch.float32 else None
    for start in range(0, n_bytes, chunk):
        stop = min(start + chunk, n_bytes)
        index_part = index[:stop - start]
        index_part.copy_(packed[start:stop])  # uint8 -> int32, index_select's index type
        if pairs is None:  # float32: the levels land in the output and are scaled there
            values = torch.index_select(rows, 0, index_part, out=out.view(torch.int64)[start:stop])
            values.view(torch.float32).view(-1, block_size).mul_(absmax[2 * start // block_size:2 * stop // block_size, None])
        else:  # float32 product in the scratch, rounded once into the output's dtype
            values = torch.index_select(rows, 0, index_part, out=pairs[:stop - start])
            torch.mul(values.view(torch.float32).view(-1, block_size),
                      absmax[2 * start // block_size:2 * stop // block_size, None],
                      out=out[2 * start:2 * stop].view(-1, block_size))
    return out  # [n]
