"""Our NF4 quantizer against bitsandbytes' quantize_4bit / dequantize_4bit on CPU.

Everything here is bit-identical: the NF4 table, the dynamic 8-bit code, the packed
bytes, the scales, the double-quantized scales (with dq_rounding="lut", bitsandbytes' CPU
rule) and the dequantized tensors in float32, float16 and bfloat16. One exception is
bitsandbytes' own: where a row of the weight does not hold whole blocks, its AVX-512
dequantize kernel picks the wrong scales, so there we compare with the definition. The
same quantizer with bnb_fp4_levels() reproduces bitsandbytes' FP4 (quant_type="fp4").
"""

import pytest
import torch

pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb  # noqa: E402  (prints a harmless "kernels" warning)

from lora_edu.quant.double_quant import dynamic_map  # noqa: E402
from lora_edu.quant.levels import bnb_fp4_levels, nf4_levels  # noqa: E402
from lora_edu.quant.quantized import quantize_4bit, quantize_nf4  # noqa: E402


@pytest.fixture(autouse=True)
def _eager_bitsandbytes_fallback():
    # bitsandbytes dequantizes odd widths and blocks >= 2048 in torch, torch.compile'd once
    # per shape and dtype (about a second each here); run it eagerly, the same operations.
    with torch.compiler.set_stance("force_eager"):
        yield


def _weights(kind: str, shape, seed: int, block_size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    w = torch.randn(n, generator=g)
    if kind == "student_t":  # heavy tails: a few huge weights set their blocks' absmax
        chi2 = torch.randn(n, 3, generator=g).square().sum(dim=1)  # 3 degrees of freedom
        w = w / (chi2 / 3).sqrt()  # Student-t with 3 degrees of freedom
    elif kind == "zeros":  # exact zeros, and whole blocks of them
        w[::3] = 0
        w[64:256] = 0
    elif kind == "midpoints":  # w / absmax within an ulp or two of a midpoint between levels
        lv = nf4_levels()
        mids = (lv[:-1] + lv[1:]) / 2
        absmax = (torch.rand(-(-n // block_size), generator=g) * 3 + 0.1).repeat_interleave(block_size)[:n]
        w = (mids[torch.randint(0, 15, (n,), generator=g)].double() * absmax.double()).float()
        w = torch.nextafter(w, w + torch.randint(-1, 2, (n,), generator=g).float())  # one ulp either way, or none
        w[::block_size] = absmax[::block_size]  # each block's largest value, the ragged last one too
    return w.view(shape)


def _bnb_quantize(w, block_size, double_quant=False):
    packed, state = bnb.quantize_4bit(w, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)
    w_hat = bnb.dequantize_4bit(packed, state)
    return packed, state, w_hat.view(w.shape)  # a 1-D weight comes back as [1, n]


def _table_values(packed, n):
    """bitsandbytes' own NF4 table looked up at its packed codes, [n], float32."""
    table = bnb.get_4bit_type("nf4", device="cpu")
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0x0F], dim=1).view(-1).long()
    return table[codes[:n]]


def _by_definition(packed, state, block_size, dtype):
    """table[code] * absmax[block] from bitsandbytes' table, bytes and scales, flat."""
    n = state.shape.numel()
    return (_table_values(packed, n) * state.absmax.repeat_interleave(block_size)[:n]).to(dtype)


def _row_indexed_scales(shape, block_size) -> bool:
    """Shapes whose rows do not hold whole blocks, where bitsandbytes 0.50's AVX-512
    dequantize kernel reads scale absmax[row * (n // B) + col // B] and so gets it wrong."""
    return len(shape) > 1 and shape[-1] % 16 == 0 and shape[-1] % block_size != 0


def test_nf4_table_is_bitsandbytes_table():
    theirs = bnb.get_4bit_type("nf4", device="cpu")  # without device= it fails on a CPU-only torch
    assert torch.allclose(nf4_levels(), theirs, atol=1e-7, rtol=0)
    assert torch.equal(nf4_levels(), theirs)  # in fact to the last bit


def test_bnb_fp4_table_is_bitsandbytes_table():
    theirs = bnb.get_4bit_type("fp4", device="cpu")  # in bit-pattern order: sign bit 8, then 3 bits
    assert torch.equal(bnb_fp4_levels(), theirs.sort().values)  # to the last bit (-0.0 == +0.0 here)
    assert theirs.abs().unique().tolist()[:2] == [0.0, bnb_fp4_levels()[9].item()]  # 0, then 1/192


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, block_size", [((64, 64), 64), ((1000,), 64), ((96, 130), 256)])
def test_bnb_fp4_quantizer_is_nearest_level_in_bnb_fp4_levels(shape, block_size, dtype):
    # bitsandbytes' codes are bit patterns and ours are indices into the sorted table, so the
    # dequantized values and the scales are compared; midpoints test the tie rule as well.
    lv = bnb_fp4_levels()
    g = torch.Generator().manual_seed(sum(shape))
    n = torch.Size(shape).numel()
    mids = (lv[:-1] + lv[1:]) / 2
    c = (torch.rand(-(-n // block_size), generator=g) * 3 + 0.1).repeat_interleave(block_size)[:n]
    w = (mids[torch.randint(0, 15, (n,), generator=g)].double() * c.double()).float()
    w = torch.nextafter(w, w + torch.randint(-1, 2, (n,), generator=g).float())  # one ulp either way, or none
    w[::block_size] = c[::block_size]  # each block's absmax
    w[1::3] = torch.randn(len(w[1::3]), generator=g)  # and plain normal weights in between
    w = w.view(shape).to(dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=block_size, quant_type="fp4")
    ours = quantize_4bit(w, lv, block_size)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize().view(-1), bnb.dequantize_4bit(packed, state).view(-1))


def test_dynamic_map_is_bitsandbytes_map():
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map(signed=True))


# Shapes with numel a multiple of the block size or not, an odd count (a padding nibble),
# and an odd last dimension (bitsandbytes then dequantizes in torch instead of C).
CASES = [
    ("normal", (64, 64), 64), ("normal", (1000,), 64), ("normal", (4097,), 128), ("normal", (3, 5, 7), 32),
    ("normal", (96, 130), 256), ("normal", (37, 2048), 2048), ("normal", (4096, 3), 4096), ("normal", (33, 65), 64),
    ("student_t", (128, 96), 64), ("student_t", (999,), 128),
    ("zeros", (40, 64), 64), ("zeros", (301,), 64),
    ("midpoints", (64, 64), 64), ("midpoints", (2000,), 64), ("midpoints", (1234,), 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind, shape, block_size", CASES)
def test_codes_scales_and_dequantized_are_identical(kind, shape, block_size, dtype):
    w = _weights(kind, shape, seed=sum(shape), block_size=block_size).to(dtype)
    packed, state, w_hat = _bnb_quantize(w, block_size)
    ours = quantize_nf4(w, block_size)
    assert packed.shape == (ours.codes.numel(), 1)  # bitsandbytes returns [n_bytes, 1]
    assert torch.equal(ours.codes, packed.view(-1))  # byte for byte
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize().view(-1), _by_definition(packed, state, block_size, dtype))
    if not _row_indexed_scales(shape, block_size):
        assert torch.equal(ours.dequantize(), w_hat)  # bit-identical, in the input dtype


def test_ragged_last_block_divides_full_blocks_multiply():
    # bitsandbytes scales full blocks by w * (1 / c) but the ragged last block by w / c. The
    # two differ in the last bit now and then; find values where that flips the code.
    g = torch.Generator().manual_seed(5)
    lv = nf4_levels()
    mids = (lv[:-1] + lv[1:]) / 2
    c = torch.rand(20000, generator=g) * 3 + 0.01
    x = (mids[torch.randint(0, 15, (20000,), generator=g)].double() * c.double()).float()
    x = torch.nextafter(x, x + torch.randint(-1, 2, (20000,), generator=g).float())
    flips = (torch.bucketize(x / c, mids) != torch.bucketize(x * (1.0 / c), mids)).nonzero().view(-1)[:40]
    assert len(flips) == 40
    for xi, ci in zip(x[flips].tolist(), c[flips].tolist()):
        ragged = torch.tensor([xi, ci])  # 2 weights: one ragged block of 64
        full = torch.cat([ragged, torch.zeros(62)])  # the same two in a full block
        for w in (ragged, full):
            assert torch.equal(quantize_nf4(w).codes, bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")[0].view(-1))


@pytest.mark.parametrize("shape, block_size", [((128, 96), 64), ((10, 80), 64), ((4, 48), 32)])
def test_bitsandbytes_cpu_dequantize_when_rows_split_blocks(shape, block_size):
    # Documents a bitsandbytes 0.50 CPU behaviour rather than our code: when a row is not a
    # whole number of blocks, its AVX-512 dequantize kernel indexes the scales per row.
    # Our dequantize follows the definition; bitsandbytes' scalar path (other CPUs) does too.
    w = _weights("normal", shape, seed=3)
    packed, state, w_hat = _bnb_quantize(w, block_size)
    ours = quantize_nf4(w, block_size).dequantize()
    assert torch.equal(ours.view(-1), _by_definition(packed, state, block_size, w.dtype))
    m, n = shape
    rows, cols = torch.arange(m)[:, None], torch.arange(n)[None, :]
    per_row = _table_values(packed, m * n).view(shape) * state.absmax[rows * (n // block_size) + cols // block_size]
    assert torch.equal(w_hat, ours) or torch.equal(w_hat, per_row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, shape, block_size",
                         [("normal", (512, 512), 64), ("normal", (300, 77), 64), ("student_t", (256, 640), 128),
                          ("zeros", (128, 512), 64), ("normal", (64,), 64)])
def test_double_quantization_is_identical_with_lut_rounding(kind, shape, block_size, dtype):
    w = _weights(kind, shape, seed=7).to(dtype)
    packed, state, w_hat = _bnb_quantize(w, block_size, double_quant=True)
    ours = quantize_nf4(w, block_size, double_quant=True, dq_rounding="lut")
    dq = ours.absmax
    assert torch.equal(ours.codes, packed.view(-1))
    assert torch.equal(dq.offset, state.offset)  # the mean of the float32 scales
    assert torch.equal(dq.codes, state.absmax)  # the 8-bit codes of the scales
    assert torch.equal(dq.absmax, state.state2.absmax)  # one float32 per 256 scales
    assert torch.equal(dq.code, state.state2.code) and state.state2.blocksize == dq.block_size == 256
    theirs_scales = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(dq.dequantize(), theirs_scales)
    assert torch.equal(ours.dequantize(), w_hat)


def test_double_quantization_with_nearest_rounding_is_within_one_code():
    # rounding="nearest" (the paper's rule, and bitsandbytes' GPU one) may differ from the
    # CPU kernel's 65536-point grid by one 8-bit code on a few scales. Tolerance: one step of
    # the dynamic code times that block's second-level absmax, and that times |level| <= 1
    # for the weights. (The largest step, 0.9 / 64 = 0.0141, is the one of the top decade.)
    w = _weights("normal", (1024, 1024), seed=11)
    packed, state, w_hat = _bnb_quantize(w, 64, double_quant=True)
    ours = quantize_nf4(w, 64, double_quant=True)
    differ = ours.absmax.codes != state.absmax
    assert 0 < differ.sum() < 0.01 * differ.numel()
    assert (ours.absmax.codes.int() - state.absmax.int()).abs().max() == 1
    step = dynamic_map().diff().max() * state.state2.absmax.repeat_interleave(256)[: differ.numel()]
    slack = 1e-6  # float32 rounding of "+ offset" on scales near 3: a few ulp of 2.4e-7
    theirs_scales = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert ((ours.absmax.dequantize() - theirs_scales).abs() <= step + slack).all()
    per_weight = step.repeat_interleave(64).view(w.shape)
    assert ((ours.dequantize() - w_hat).abs() <= per_weight + slack).all()
