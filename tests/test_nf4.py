"""NF4 / INT4 / FP4 tables (E2M1 and bitsandbytes' variant), the blockwise quantizer and double
quantization (no bitsandbytes)."""

import dataclasses
import math
import subprocess
import sys
from statistics import NormalDist

import pytest
import torch

from lora_edu.quant.blockwise import quantize_blockwise
from lora_edu.quant.double_quant import DoubleQuantizedAbsmax, double_quantize, dynamic_map
from lora_edu.quant.levels import NF4_OFFSET, bnb_fp4_levels, fp4_levels, int4_levels, nf4_levels
from lora_edu.quant.quantized import QuantizedTensor, quantize_4bit, quantize_nf4
from lora_edu.quant.sizes import bits_per_param, check_block_size

TABLES = {"nf4": nf4_levels, "int4": int4_levels, "fp4": fp4_levels, "bnb_fp4": bnb_fp4_levels}


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _block_absmax(q: QuantizedTensor) -> torch.Tensor:
    """The scale that applies to each weight, [numel]."""
    scales = q.absmax.dequantize() if q.double_quant else q.absmax
    return scales.repeat_interleave(q.block_size)[: q.numel()]


# ---------------------------------------------------------------- the tables


def test_nf4_levels_shape_and_symmetry_break():
    lv = nf4_levels()
    assert lv.dtype == torch.float32 and lv.shape == (16,)
    assert (lv[1:] > lv[:-1]).all()  # sorted, 16 distinct values
    assert (lv == 0).sum() == 1 and lv[7] == 0  # exactly one zero, exact
    assert lv.min() == -1 and lv.max() == 1
    assert (lv > 0).sum() == 8 and (lv < 0).sum() == 7


# The offset of the QLoRA reference code (the default of bitsandbytes.functional.create_normal_map),
# written here rather than read from lora_edu, so that a changed constant fails.
QLORA_OFFSET = 0.9677083


def test_nf4_levels_are_rescaled_normal_quantiles():
    # Built here by the documented construction, independently of the package: the standard
    # library's inverse normal CDF at the float32 probability grids linspace(offset, 0.5, 9)
    # and linspace(offset, 0.5, 8) without their 0.5 ends, mirrored, a 0 between, over the
    # largest quantile. Tolerance: the package rounds each quantile and the largest one to
    # float32 and divides in float32, three roundings of 2^-24 relative of a level <= 1.
    inv = NormalDist().inv_cdf
    p9 = torch.linspace(QLORA_OFFSET, 0.5, 9).tolist()[:-1]
    p8 = torch.linspace(QLORA_OFFSET, 0.5, 8).tolist()[:-1]
    top = inv(p9[0])
    expected = sorted([inv(p) / top for p in p9] + [-inv(p) / top for p in p8] + [0.0])
    assert NF4_OFFSET == QLORA_OFFSET
    assert torch.allclose(nf4_levels().double(), torch.tensor(expected, dtype=torch.float64),
                          atol=3 * 2.0 ** -24, rtol=0)


def test_nf4_positive_levels_split_equal_probability_mass():
    # Phi(level * top) of the positive levels steps evenly from 0.5 to the offset: every
    # gap between neighbouring levels holds the same share of N(0, 1), (offset - 0.5) / 8.
    # (offset: its float32 value, the one the grid starts from)
    offset = float(torch.tensor(QLORA_OFFSET))
    top = NormalDist().inv_cdf(offset)
    cdf = torch.tensor([NormalDist().cdf(v * top) for v in nf4_levels()[7:].tolist()], dtype=torch.float64)
    masses = cdf.diff()
    assert torch.allclose(masses, torch.full_like(masses, (offset - 0.5) / 8), atol=1e-6)


def test_int4_levels():
    lv = int4_levels()
    assert lv.shape == (16,) and (lv[1:] >= lv[:-1]).all()
    distinct = lv.unique()
    assert distinct.numel() == 15 and lv[0] == lv[1] == -1 and lv.max() == 1 and (lv == 0).sum() == 1
    assert torch.allclose(distinct.diff(), torch.full((14,), 1 / 7))  # evenly spaced
    assert torch.equal(distinct, -distinct.flip(0))  # symmetric


def test_fp4_levels_are_e2m1():
    lv = fp4_levels()
    magnitudes = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert lv.shape == (16,) and (lv[1:] >= lv[:-1]).all()
    assert sorted((lv * 6).tolist()) == sorted([-m for m in magnitudes] + magnitudes)
    assert torch.signbit(lv[7]) and not torch.signbit(lv[8]) and lv[7] == lv[8] == 0  # -0.0 then +0.0
    assert lv.min() == -1 and lv.max() == 1


def test_bnb_fp4_levels_differ_from_e2m1_only_in_the_subnormal():
    lv, e2m1 = bnb_fp4_levels(), fp4_levels()
    magnitudes = [0, 1 / 192, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 1]
    assert lv.shape == (16,) and (lv[1:] >= lv[:-1]).all()
    assert torch.allclose(lv, torch.tensor(sorted([-m for m in magnitudes] + magnitudes)), atol=1e-8, rtol=0)
    subnormal = torch.tensor([6, 9])  # +-1/192 here, +-1/12 in E2M1
    same = torch.ones(16, dtype=torch.bool).index_fill_(0, subnormal, False)
    assert torch.equal(lv[same], e2m1[same]) and torch.equal(torch.signbit(lv), torch.signbit(e2m1))
    assert torch.equal(lv[subnormal] * 16, e2m1[subnormal])  # (1/32 instead of 1/2 of the smallest normal)


def test_dynamic_map():
    code = dynamic_map()
    assert code.shape == (256,) and (code[1:] > code[:-1]).all()
    assert (code == 0).sum() == 1 and code.max() == 1 and (code > 0).sum() == 128
    assert math.isclose(code[0].item(), -(0.9859375 + 1) / 2, rel_tol=1e-6)  # top bin centre
    positive = code[(code > 0) & (code < 1)]
    assert math.isclose(positive.min().item(), 0.55e-6, rel_tol=1e-5)  # 7 decades down
    decades = torch.floor(torch.log10(positive)).long()  # 64 in [0.1, 1), 32 in [0.01, 0.1), ...
    assert torch.bincount(decades + 7).tolist() == [1, 2, 4, 8, 16, 32, 64]


# ---------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("block_size", [32, 64, 256])
def test_error_is_at_most_half_the_largest_gap(table, block_size):
    lv = TABLES[table]()
    w = torch.cat([_randn(3000), 0.01 * _randn(1000, seed=1), torch.linspace(-5, 5, 999)])
    q = quantize_4bit(w, lv, block_size)
    err = (q.dequantize() - w).abs()
    bound = lv.diff().max() / 2 * _block_absmax(q)
    assert (err <= bound * (1 + 1e-6) + 1e-12).all()


def test_rounds_to_the_nearest_level():
    w = _randn(4096, seed=3)
    codes, absmax = quantize_blockwise(w, nf4_levels(), 64)
    scaled = (w.view(-1, 64) / absmax[:, None]).view(-1, 1)
    brute = (scaled - nf4_levels()).abs().argmin(dim=1)  # [n], nearest by exhaustive search
    assert torch.equal(codes.long(), brute)


@pytest.mark.parametrize("shape", [(1,), (63,), (65,), (1000,), (17, 241), (5, 13), (2, 3, 7)])
def test_padding_is_dropped(shape):
    w = _randn(*shape, seed=4)
    q = quantize_nf4(w)
    n = w.numel()
    assert q.codes.shape == ((n + 1) // 2,) and q.absmax.shape == (-(-n // 64),)
    w_hat = q.dequantize()
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    # the same weights followed by zeros up to a whole block give the same codes and scales
    # (random values sit on no midpoint, so the ragged block's division rule cannot matter)
    padded = quantize_nf4(torch.cat([w.flatten(), torch.zeros(-n % 64 + 64)]))
    assert torch.equal(padded.dequantize()[:n], w_hat.flatten())
    assert torch.equal(padded.absmax[: q.n_blocks], q.absmax)


def test_all_zero_blocks_give_zeros():
    w = torch.zeros(300)
    w[64:128] = _randn(64)
    for dq in (False, True):
        w_hat = quantize_nf4(w, double_quant=dq).dequantize()
        assert not w_hat.isnan().any()
        assert (w_hat[:64] == 0).all() and (w_hat[128:] == 0).all()
    assert (quantize_nf4(torch.zeros(5, 7), double_quant=True).dequantize() == 0).all()
    # Any code reads back as 0 in a block whose scale is 0, so check the codes themselves: a zero
    # block stores the code of the level 0.0 twice per byte (its absmax is clamped before 1 / c,
    # so 0 / c is 0, not NaN), as bitsandbytes does.
    zero = int((nf4_levels() == 0).nonzero())  # the index of 0.0 in the sorted table
    q = quantize_nf4(w)
    assert q.codes[:32].tolist() == [(zero << 4) | zero] * 32  # block 0: 64 zero weights in 32 bytes
    assert q.codes[64:].tolist() == [(zero << 4) | zero] * (len(q.codes) - 64)  # blocks 2..4 (the last ragged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    w = _randn(40, 50, dtype=dtype)
    q = quantize_nf4(w)
    assert q.dequantize().dtype == dtype and q.dequantize(torch.float32).dtype == torch.float32
    ref = quantize_nf4(w.float())  # the arithmetic runs in float32 whatever the input
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.absmax, ref.absmax)
    assert torch.equal(q.dequantize(), ref.dequantize().to(dtype))


def test_pack_order_first_code_in_high_nibble():
    lv = nf4_levels()
    w = torch.tensor([1.0, -1.0, 0.0, lv[12].item(), lv[3].item()])  # absmax 1: codes 15, 0, 7, 12, 3
    q = quantize_nf4(w)
    # bytes: (15, 0) -> 0xF0, (7, 12) -> 0x7C, (3, pad) -> 0x37 (an odd count pads with 0.0's code)
    assert q.codes.tolist() == [0xF0, 0x7C, 0x37]
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("table", TABLES)
def test_ties_go_to_the_lower_level(table):
    lv = TABLES[table]()
    mids = (lv[:-1] + lv[1:]) / 2  # float32 midpoints
    above = torch.nextafter(mids, torch.tensor(2.0))
    w = torch.cat([torch.tensor([1.0]), mids, above])  # the 1.0 makes absmax 1, so w / absmax = w
    codes, _ = quantize_blockwise(w, lv, 64)
    on_mid, past_mid = codes[1:16], codes[16:]
    assert torch.equal(lv[on_mid.long()], lv[:-1])  # exactly on a midpoint: the lower level
    distinct = lv[1:] != lv[:-1]  # (INT4 and FP4 repeat a level; their midpoint is the level)
    assert torch.equal(lv[past_mid.long()][distinct], lv[1:][distinct])  # one ulp above: the upper


# ---------------------------------------------------------------- accuracy and memory


@pytest.mark.parametrize("block_size, expected", [(32, 0.0677), (64, 0.0728), (128, 0.0768), (256, 0.0803)])
def test_nf4_mean_absolute_error_matches_bitsandbytes_reference(block_size, expected):
    w = _randn(1024, 1024)
    mae = (quantize_nf4(w, block_size).dequantize() - w).abs().mean().item()
    assert abs(mae - expected) < 1e-3


def test_nf4_beats_int4_and_fp4_on_normal_weights():
    w = _randn(1024, 1024)
    mae = {name: (quantize_4bit(w, f(), 64).dequantize() - w).abs().mean().item() for name, f in TABLES.items()}
    assert mae["nf4"] < mae["fp4"] < mae["int4"] < mae["bnb_fp4"]  # bitsandbytes' FP4: no level near 1/12


def test_bits_per_param_and_the_65b_saving():
    assert bits_per_param() == 4.5
    assert bits_per_param(double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(bits_per_param(double_quant=True), 3) == 4.127
    assert bits_per_param(128) == 4.25 and bits_per_param(64, absmax_bits=16) == 4.25
    saved_gb = (bits_per_param() - bits_per_param(double_quant=True)) * 65e9 / 8 / 1e9
    assert 2.9 < saved_gb < 3.1  # "about 3 GB" for a 65B model


@pytest.mark.parametrize("dq", [False, True])
def test_nbytes_match_bits_per_param(dq):
    q = quantize_nf4(_randn(1024, 1024), double_quant=dq)
    offset_bits = 32 if dq else 0  # the one float32 offset bits_per_param leaves out
    assert 8 * q.nbytes == bits_per_param(double_quant=dq) * q.numel() + offset_bits
    assert ("double-quantized" in repr(q)) == dq and "NF4" in repr(q) and "(1024, 1024)" in repr(q)


def test_double_quantization_keeps_the_scales_close():
    w = _randn(512, 512) * torch.linspace(0.1, 3, 512)  # rows of different scale
    single, double = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    c, c_hat = single.absmax, double.absmax.dequantize()
    step = dynamic_map().diff().max()  # the coarsest step of the 8-bit code, near +-1
    bound = step / 2 * double.absmax.absmax.repeat_interleave(256)[: c.numel()]
    assert ((c_hat - c).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(double.codes, single.codes)  # only the scales change
    mae_single = (single.dequantize() - w).abs().mean()
    mae_double = (double.dequantize() - w).abs().mean()
    assert abs(mae_double / mae_single - 1) < 0.01


def test_lut_rounding_differs_from_nearest_by_at_most_one_code():
    c = quantize_nf4(_randn(1024, 1024)).absmax
    nearest, lut = double_quantize(c), double_quantize(c, rounding="lut")
    diff = nearest.codes.int() - lut.codes.int()
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.01
    assert torch.equal(nearest.absmax, lut.absmax) and torch.equal(nearest.offset, lut.offset)


def test_one_block_double_quantizes_exactly():
    q = quantize_nf4(_randn(64), double_quant=True)  # one scale, equal to its own mean
    assert torch.equal(q.absmax.dequantize(), quantize_nf4(_randn(64)).absmax)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-64, ValueError), (48, ValueError),
                                        (64.0, TypeError), ("64", TypeError), (True, TypeError)])
def test_bad_block_size(bad, error):
    with pytest.raises(error, match="power of two"):
        quantize_nf4(_randn(128), block_size=bad)
    with pytest.raises(error, match="dq_block_size"):
        quantize_nf4(_randn(128), double_quant=True, dq_block_size=bad)
    with pytest.raises(error):
        bits_per_param(bad)
    assert check_block_size(64) == 64


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_non_finite_input(value, word):
    w = _randn(200)
    w[150] = value
    with pytest.raises(ValueError, match=word):
        quantize_nf4(w)


@pytest.mark.parametrize("w", [torch.arange(64), torch.ones(64, dtype=torch.float64), [0.5] * 64],
                         ids=["int64", "float64", "list"])
def test_non_float_input(w):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16|torch.Tensor"):
        quantize_nf4(w)


def test_empty_input():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 64))


def test_tampered_absmax():
    q = quantize_nf4(_randn(10, 64))
    with pytest.raises(ValueError, match=r"one scale per block.*\(10,\)"):
        dataclasses.replace(q, absmax=q.absmax[:-1])
    with pytest.raises(ValueError, match="one scale per block"):
        dataclasses.replace(q, absmax=q.absmax.view(2, 5))
    with pytest.raises(TypeError, match="float32"):
        dataclasses.replace(q, absmax=q.absmax.double())
    q.absmax = torch.cat([q.absmax, q.absmax])  # edited after construction: caught on use
    with pytest.raises(ValueError, match="one scale per block"):
        q.dequantize()


def test_tampered_double_quantized_absmax():
    q = quantize_nf4(_randn(1024, 64), double_quant=True)  # 1024 scales in 4 blocks of 256
    q.absmax.absmax = q.absmax.absmax[:-1]
    with pytest.raises(ValueError, match="second-level absmax"):
        q.dequantize()
    q = quantize_nf4(_randn(1024, 64), double_quant=True)
    q.absmax.codes = q.absmax.codes.int()
    with pytest.raises(TypeError, match="uint8"):
        q.dequantize()
    with pytest.raises(ValueError, match="one scale per block"):
        dataclasses.replace(q, absmax=double_quantize(torch.rand(1000)))  # 1000 scales for 1024 blocks


@pytest.mark.parametrize("convert", [lambda c: c.int(), lambda c: c.float(), lambda c: c.long()],
                         ids=["int32", "float32", "int64"])
def test_tampered_codes_dtype(convert):
    q = quantize_nf4(_randn(100))
    q.codes = convert(q.codes)
    with pytest.raises(TypeError, match="codes must be a uint8"):
        q.dequantize()


def test_tampered_codes_length_and_dequantize_dtype():
    q = quantize_nf4(_randn(100))
    with pytest.raises(ValueError, match=r"codes must have shape \(50,\)"):
        dataclasses.replace(q, codes=q.codes[:-1])
    with pytest.raises(TypeError, match="dequantize to"):
        q.dequantize(torch.int8)


def test_bad_levels_and_rounding():
    w = _randn(64)
    with pytest.raises(ValueError, match="16 levels"):
        quantize_4bit(w, torch.linspace(-1, 1, 8))
    with pytest.raises(ValueError, match="sorted"):
        quantize_4bit(w, nf4_levels().flip(0))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        quantize_4bit(w, 2 * nf4_levels())
    with pytest.raises(ValueError, match="rounding"):
        quantize_nf4(w, double_quant=True, dq_rounding="stochastic")
    with pytest.raises(ValueError, match="1-D float32"):
        double_quantize(torch.ones(4, 4))
    assert isinstance(double_quantize(torch.rand(10)), DoubleQuantizedAbsmax)


# ------------------------------------------------------------------ the fast dequantization path
def _definition(q):
    """dequantize by the definition: unpack every code, look it up, scale its block."""
    from lora_edu.quant.blockwise import dequantize_blockwise, unpack_nibbles
    scales = q.absmax.dequantize() if q.double_quant else q.absmax
    codes = unpack_nibbles(q.codes, q.numel())
    return dequantize_blockwise(codes, scales, q.levels, q.block_size).view(q.shape)


@pytest.mark.parametrize("table", [nf4_levels, fp4_levels, int4_levels])
@pytest.mark.parametrize("shape, block", [((64, 128), 64), ((32, 32), 32), ((3, 70), 64), ((256,), 256)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_dequantize_is_the_definition_bit_for_bit(table, shape, block, out_dtype):
    torch.manual_seed(0)
    q = quantize_4bit(torch.randn(shape), table(), block_size=block)
    fast = q.dequantize(out_dtype)
    slow = _definition(q).to(out_dtype)
    assert torch.equal(fast.view(torch.int16 if out_dtype != torch.float32 else torch.int32),
                       slow.view(torch.int16 if out_dtype != torch.float32 else torch.int32))  # -0.0 too


def test_compiled_dequantize_is_the_eager_one_bit_for_bit():
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(64, 128), double_quant=True)
    assert torch.equal(q.dequantize(torch.float32, compiled=True), q.dequantize(torch.float32))


def test_importing_and_eager_dequantize_never_load_the_compiler():
    code = ("import sys, torch, lora_edu; q = lora_edu.quantize_nf4(torch.randn(64, 64)); q.dequantize(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("block", [64, 1 << 20])  # many blocks per chunk; a block longer than a chunk
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fast_dequantize_across_chunks_is_the_definition(monkeypatch, block, out_dtype):
    """The eager path works through CHUNK_BYTES at a time; a ragged last chunk must not lose weights."""
    import lora_edu.quant.blockwise as blockwise
    monkeypatch.setattr(blockwise, "CHUNK_BYTES", 1 << 10)  # 2048 weights a chunk, so a small tensor spans many
    torch.manual_seed(0)
    n = 5 * (1 << 20) if block > 1 << 11 else 2048 * 7 + 64 * 3  # 7 whole chunks and part of an eighth
    q = quantize_nf4(torch.randn(n), block_size=block)
    bits = torch.int32 if out_dtype == torch.float32 else torch.int16
    assert torch.equal(q.dequantize(out_dtype).view(bits), _definition(q).to(out_dtype).view(bits))
