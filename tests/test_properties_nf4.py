"""Laws of NF4 quantization for every shape, block size, dtype and weight (hypothesis).

    the codes and scales equal bitsandbytes' quantize_4bit(quant_type="nf4") on the CPU
    each code is a nearest NF4 level of w / absmax
    every weight's error is at most half the largest gap between neighbouring levels times its
    block's absmax, plus the rounding of the arithmetic (argued at error_bound)
    a 16-bit dequantize is the float32 one rounded once

The level table used here is bitsandbytes' own (get_4bit_type), not lora_edu's constant, and the
block absmax is recomputed here from the weights.

One exception, bitsandbytes' and so lora_edu's: a block whose absmax c is below 1e-38 (float32 or
bfloat16 subnormals; float16 cannot get there) is scaled by 1 / 1e-38 instead of 1 / c, so its
codes are not the nearest levels of w / c and its error is bounded by c, not by a fraction of it
(test_blocks_below_1e38_are_scaled_by_1e38).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb  # noqa: E402

from lora_edu.quant.quantized import quantize_nf4  # noqa: E402

#: the block sizes bitsandbytes.functional.quantize_4bit accepts (it raises "invalid blocksize"
#: for any other); its CPU kernel (backends/default/ops.py, torch ops) then runs for all of them
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
LEVELS = bnb.get_4bit_type("nf4", device="cpu").double().sort().values  # [16], bitsandbytes' table
MAX_GAP = LEVELS.diff().max().item()  # 1 - 0.7230 = 0.2770, between the two largest levels
U32 = 2.0 ** -24
#: bitsandbytes clamps each block's absmax to at least this before taking 1 / absmax
#: (backends/default/ops.py, quantize_4bit: absmax.clamp(min=1e-38)), as a float32
BNB_MIN_ABSMAX = torch.tensor(1e-38).item()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NP_DTYPE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.float32}


def step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of v's dtype just above |v|, as float64 (at 0: the smallest subnormal)."""
    a = v.detach().abs()
    return torch.nextafter(a, torch.full_like(a, math.inf)).double() - a.double()


@st.composite
def weights(draw):
    """(w, block_size): a tensor of 1 to ~2000 weights in 1 to 3 dims, in one of three kinds."""
    dtype = draw(st.sampled_from(DTYPES))
    block_size = draw(st.sampled_from(BNB_BLOCK_SIZES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40).filter(
        lambda s: math.prod(s) <= 2048))
    n = math.prod(shape)
    kind = draw(st.sampled_from(["normal", "any floats", "midpoints"]))
    if kind == "any floats":  # hypothesis' own floats: zeros, repeats, subnormals, extremes
        finite = dict(allow_nan=False, allow_infinity=False)
        if dtype == torch.float16:
            elements = st.floats(width=16, **finite)
        elif dtype == torch.bfloat16:  # float32 values that stay finite when rounded to bfloat16
            elements = st.floats(-1.5 * 2.0 ** 127, 1.5 * 2.0 ** 127, width=32, **finite)
        else:
            elements = st.floats(width=32, **finite)
        w = torch.from_numpy(draw(hnp.arrays(NP_DTYPE[dtype], shape, elements=elements)).copy())
        return w.to(dtype), block_size
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = 2.0 ** draw(st.integers(-20, 12 if dtype == torch.float16 else 40))  # fp16 ends near 2^16
    if kind == "normal":
        return (torch.randn(n, generator=g) * scale).view(shape).to(dtype), block_size
    # w / absmax on (or one float32 ulp either side of) a midpoint between two levels: the tie rule
    mids = ((LEVELS[:-1] + LEVELS[1:]) / 2).float()
    c = (torch.rand(-(-n // block_size), generator=g) + 0.5).repeat_interleave(block_size)[:n] * scale
    w = (mids[torch.randint(0, 15, (n,), generator=g)].double() * c.double()).float()
    w = torch.nextafter(w, w + torch.randint(-1, 2, (n,), generator=g).float())
    w[::block_size] = c[::block_size]  # each block's absmax, the ragged last block's too
    return w.view(shape).to(dtype), block_size


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Two codes per byte, the first in the high nibble (bitsandbytes' layout): [n] int64."""
    b = packed.view(-1).long()
    return torch.stack([b >> 4, b & 15], dim=1).view(-1)[:n]


def block_absmax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """max |w| over each weight's block, repeated per weight: [n] float64, from w alone."""
    flat = w.reshape(-1).double().abs()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    return blocks.amax(dim=1).repeat_interleave(block_size)[: flat.numel()]


# Counter-example hypothesis found: one zero weight, a ragged block of 1 in 32. bitsandbytes
# stores the ragged last block's absmax clamped to 1e-38, full blocks' unclamped; lora_edu stored
# 0. Fixed in lora_edu/quant/blockwise.py (scale_blocks), which now stores the same.
@example(wb=(torch.zeros(1), 32))
@example(wb=(torch.cat([torch.linspace(-1, 1, 64), torch.zeros(10)]), 64))  # a full block, then a zero ragged one
@given(weights())
def test_codes_and_scales_equal_bitsandbytes(wb):
    w, block_size = wb
    packed, state = bnb.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    ours = quantize_nf4(w, block_size)
    assert torch.equal(ours.codes, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)


# Counter-example hypothesis found (first for the nearest-level law, in a deep run): a single
# float32 subnormal weight, 7.8e-41, is its block's absmax, but the block is scaled by 1e38, not
# by 1 / 7.8e-41, so w / c = 1 is stored as the level 0: error 7.8e-41, all of c.
TINY = torch.tensor([55822 * 2.0 ** -149])  # 7.8223e-41, a float32 subnormal


def error_bound(c: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """How far w_hat = dequantize(quantize(w)) may be from w, per weight, with c its block's absmax.

    The quantizer rounds s = w / c to the nearest level, so |s - level| <= MAX_GAP / 2 if s were
    exact. It is not: full blocks compute fl(w * fl(1 / c)) (two float32 roundings), the ragged
    last block fl(w / c) (one), each at most u |s| <= u; the midpoints it compares s with are
    float32 roundings of the exact ones, off by at most u more. So the code is the farther of two
    neighbours only where w / c is within 3u of their midpoint, and |w / c - level| <= MAX_GAP / 2
    + 3u (u^2 terms aside, which the output's half step below covers), hence
    |w - c level| <= c (MAX_GAP / 2 + 3u). Dequantize computes c * level in float32
    (one more rounding, <= u c) and rounds that to the output dtype: at most half a step of the
    result in that dtype (the float32 rounding of c * level included, when the dtype is float32).

    A block with c < 1e-38 is scaled by 1e38 instead (see the module docstring): t = w * 1e38
    lies in (-1, 1) and rounds to a level of its own sign or to 0, so the stored c' * level (c'
    = c, or 1e-38 for the ragged last block, whose t is then w / c') has the sign of w and at
    most its size or c: the error is at most c, plus the same output rounding.
    """
    fraction = torch.where(c >= BNB_MIN_ABSMAX, MAX_GAP / 2 + 4 * U32, 1.0)
    return c * fraction + step(w_hat) / 2


@example(wb=(TINY, 32))
@given(weights())
def test_error_is_at_most_half_the_largest_gap_times_absmax(wb):
    w, block_size = wb
    q = quantize_nf4(w, block_size)
    w_hat = q.dequantize()  # in w's dtype
    assert w_hat.dtype == w.dtype and w_hat.shape == w.shape
    err = (w_hat.double() - w.double()).reshape(-1).abs()
    bound = error_bound(block_absmax(w, block_size), w_hat.reshape(-1))
    i = (err / bound).nan_to_num(math.inf).argmax()  # the weight closest to (or furthest past) its bound
    assert (err <= bound).all(), f"weight {i}: err {err[i]:.3g} against a bound of {bound[i]:.3g}"


def near_midpoint_block():
    """A block where w / c = 0.86147851 lies 1.55u above the midpoint of the levels 0.7230 and 1."""
    w = torch.zeros(32)
    w[0], w[1] = 0.9779776930809021, 0.8425067663192749  # c, and w
    return w


# Counter-example a deep run found to this test's own first tolerance (3u): the block above,
# where the float32 w * fl(1 / c) lands below the midpoint and picks 0.7230, which is 3.1u
# farther from the exact w / c than 1 is. The tolerance is now argued (6u, below).
@example(wb=(near_midpoint_block(), 32))
@example(wb=(TINY, 32))
@given(weights())
def test_each_code_is_a_nearest_level(wb):
    w, block_size = wb
    q = quantize_nf4(w, block_size)
    codes = unpack(q.codes, w.numel())
    c = block_absmax(w, block_size)
    scaled_by_c = c >= BNB_MIN_ABSMAX  # the others are scaled by 1e38 (next test)
    s = w.reshape(-1).double() / c.clamp(min=BNB_MIN_ABSMAX)  # exact w / c, in [-1, 1]
    dist = (s[:, None] - LEVELS[None, :]).abs()  # [n, 16]
    chosen = dist.gather(1, codes[:, None]).squeeze(1)
    # As at error_bound, the float32 w / c and midpoint are within 3u of the exact ones, so the
    # code can be the farther neighbour only where w / c lies within 3u of a midpoint m; there
    # the farther level is 2 |w / c - m| <= 6u farther than the nearer one.
    assert (chosen <= dist.min(dim=1).values + 6 * U32)[scaled_by_c].all()


def test_blocks_below_1e38_are_scaled_by_1e38():
    """The counter-example, and a full block of such weights: bitsandbytes' codes, error <= c."""
    for w in (TINY, TINY * torch.linspace(-1, 1, 64)):
        q = quantize_nf4(w, 32 if w.numel() == 1 else 64)
        packed, state = bnb.quantize_4bit(w, blocksize=q.block_size, quant_type="nf4")
        assert torch.equal(q.codes, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
        levels = LEVELS[unpack(q.codes, w.numel())]
        s = w.double() / w.abs().max().double()  # w / c
        assert (levels - s).abs().max() > MAX_GAP / 2  # not the nearest level of w / c ...
        nearest_to_w_over_1e38 = (w.double() / BNB_MIN_ABSMAX - LEVELS[:, None]).abs().argmin(0)
        assert torch.equal(levels, LEVELS[nearest_to_w_over_1e38])  # ... but of w / 1e-38
        assert ((q.dequantize().double() - w.double()).abs() <= w.abs().max().double()).all()


@given(weights())
def test_16_bit_dequantize_is_the_float32_one_rounded_once(wb):
    w, block_size = wb
    q = quantize_nf4(w, block_size)
    assert torch.equal(q.dequantize(), q.dequantize(torch.float32).to(w.dtype))
