"""Three 4-bit data types: NF4, INT4 and FP4 (two variants), each a table of 16 levels in [-1, 1].

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314,
section 3 (4-bit NormalFloat). A 4-bit code is an index into one of these tables; a
weight w in a block with absolute maximum c is stored as the code k whose level is
nearest to w / c, and read back as

    w_hat = c * levels[k]

NF4 places the levels at quantiles of the standard normal N(0, 1): with Phi^-1 the
inverse normal CDF, the levels are Phi^-1(p_i) for evenly spaced probabilities p_i,
rescaled so the largest is 1. Each bin between neighbouring levels then holds about the
same share of normally distributed weights, so no code is wasted on the empty tails, which
is where evenly spaced INT4 loses. Equal shares maximise the entropy of the codes, which is
not the same as the least squared error (a Lloyd-Max quantizer has that), and the values
actually rounded are w / c of absmax-scaled blocks, not N(0, 1) draws: chapter 3 measures
both. The tables are built here from their definitions, never typed in; blockwise.py turns
any of them into a quantizer.
"""

from __future__ import annotations

import torch

#: QLoRA's outermost probability: Phi^-1(0.9677083) = 1.848, so the largest level sits
#: near 1.85 sigma. Going all the way to p = 1 would put it at infinity.
NF4_OFFSET = 0.9677083


def _normal_quantiles(n: int) -> torch.Tensor:
    """Phi^-1(p) for the n probabilities linspace(offset, 0.5, n + 1) without the 0.5 end."""
    # The QLoRA reference builds this grid in float32 (torch's default dtype) and takes
    # the quantiles in float64; doing the same reproduces its table to the last bit.
    # A float64 grid would move some levels by a few ulp.
    p = torch.linspace(NF4_OFFSET, 0.5, n + 1, dtype=torch.float32)[:-1]  # [n], high to low
    return torch.special.ndtri(p.double()).float()  # [n], decreasing, all > 0


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, sorted, float32: 7 negative, an exact 0, 8 positive, min -1, max 1.

    Why an exact zero: each half is a grid of probabilities from the offset down to 0.5
    with the 0.5 end dropped, and the quantile of p = 0.5, which is exactly 0, is put in
    once between them. Zero weights (padding, pruned entries) then round-trip exactly,
    which a symmetric 16-level table (8 per side) could not do: its two middle levels
    would straddle 0.

    Why asymmetric (8 positive, 7 negative): 16 codes minus the one spent on 0 leave 15,
    an odd number, so one side gets the extra level. QLoRA gives it to the positive side:
    8 quantiles from linspace(offset, 0.5, 9) and 7 from linspace(offset, 0.5, 8),
    mirrored. Both sides reach the same outermost quantile, so after dividing by the
    largest level the table spans exactly [-1, 1], and absmax scaling uses the whole range.
    """
    positive = _normal_quantiles(8)  # [8]
    negative = -_normal_quantiles(7)  # [7]
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values  # [16]
    return levels / levels.max()  # [16], max exactly 1; min exactly -1 (same outer quantile)


def int4_levels() -> torch.Tensor:
    """16 evenly spaced levels for symmetric absmax INT4: k / 7 for k = -7..7, and -1 twice.

    Sixteen evenly spaced levels cannot be symmetric and contain 0 at the same time. The
    choice here is the usual symmetric integer quantizer, code = round(7 * w / absmax):
    15 distinct levels with an exact 0 and both ends at +-1, so the block's largest weight
    is stored exactly whatever its sign. The 16th code (-8 in two's complement) would mean
    -8/7, outside [-1, 1]; it is kept as a second -1 so every table has 16 entries.
    (The other common choice, k / 8 for k = -8..7, uses all 16 codes but cannot store +1.)
    """
    k = torch.arange(-7, 8, dtype=torch.float32)  # [15]: -7..7
    return torch.cat([torch.tensor([-1.0]), k / 7])  # [16], sorted (-1 appears twice)


def _e2m1_normal_magnitudes() -> torch.Tensor:
    """The six normal magnitudes of E2M1, (1 + m/2) * 2^(e-1) for e = 1..3: 1, 1.5, 2, 3, 4, 6."""
    e = torch.arange(1, 4, dtype=torch.float32)  # normal exponents 1..3
    m = torch.tensor([0.0, 1.0])  # mantissa bit
    return ((1 + m / 2) * 2 ** (e[:, None] - 1)).flatten()  # [6], increasing


def _signed_table(magnitudes: torch.Tensor) -> torch.Tensor:
    """Eight magnitudes (0 first, the largest last) -> 16 sorted levels in [-1, 1], -0.0 and +0.0 both kept."""
    return torch.cat([-magnitudes.flip(0), magnitudes]) / magnitudes.max()  # [16]


def fp4_levels() -> torch.Tensor:
    """The 16 values of the E2M1 float (1 sign, 2 exponent, 1 mantissa bit) divided by 6.

    E2M1 with exponent bias 1 has the magnitudes 0 and 0.5 (subnormal) and
    (1 + m/2) * 2^(e-1) for e = 1..3: 1, 1.5, 2, 3, 4, 6. With a sign bit that is
    +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, and dividing by 6 maps it onto [-1, 1]. The table is
    sorted, so -0.0 and +0.0 both appear: a float format spends one of its 16 codes on a
    second zero. Code k here is the k-th smallest value, not the E2M1 bit pattern.

    This is the standard E2M1 of the OCP microscaling formats. bitsandbytes' own "fp4"
    table is a different variant: bnb_fp4_levels below.
    """
    magnitudes = torch.cat([torch.tensor([0.0, 0.5]), _e2m1_normal_magnitudes()])  # [8], increasing
    return _signed_table(magnitudes)  # [16]: -1 .. -0.0, +0.0 .. 1


def bnb_fp4_levels() -> torch.Tensor:
    """bitsandbytes' FP4 table, sorted: E2M1's levels with its subnormal moved almost onto 0.

    This is the table behind bitsandbytes' quantize_4bit(quant_type="fp4") (the one
    bitsandbytes.functional.get_4bit_type("fp4") returns, there in bit-pattern order). Its
    six normal magnitudes are E2M1's, 1, 1.5, 2, 3, 4 and 6 in units of the smallest
    normal (bitsandbytes writes them as 2, 3, 4, 6, 8, 12). Its one subnormal, though, is
    1/32 of the smallest normal where IEEE-style E2M1 has 1/2, so after dividing by the
    largest magnitude the levels are

        +-{0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1}    instead of E2M1's    +-{0, 1/12, 1/6, ...}

    Two codes then sit within 0.0053 of zero and nothing lies between 1/192 and 1/6, where
    a large share of absmax-scaled normal weights falls. Sorted like the other tables (code
    k is the k-th smallest level, -0.0 before +0.0); tests/test_nf4_parity.py checks it
    against bitsandbytes' table and quantizer.
    """
    normal = _e2m1_normal_magnitudes()  # [6]: 1 .. 6
    magnitudes = torch.cat([torch.tensor([0.0]), normal[:1] / 32, normal])  # [8], increasing
    return _signed_table(magnitudes)  # [16]: -1 .. -0.0, +0.0 .. 1
