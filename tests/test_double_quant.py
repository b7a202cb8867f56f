"""lora_edu.quant.double_quant at every second-level block size, against a definition written here
and against bitsandbytes' blockwise 8-bit quantizer.

QLoRA uses blocks of 256 scales, and test_nf4.py / test_nf4_parity.py check that one; here the
block size is a parameter (dq_block_size), so the same arithmetic must hold at 64, 128, 512 and
with a ragged last block of scales:

    offset = mean(c);   c - offset -> codes, one absmax2 per block of dq_block_size scales
    c_hat  = offset + absmax2[block] * dynamic[code]
"""

import pytest
import torch

from lora_edu import quantize_nf4
from lora_edu.quant.double_quant import double_quantize, dynamic_map
from lora_edu.quant.sizes import scale_bytes

DQ_BLOCKS = [64, 128, 512, 256]
N_SCALES = 1000  # not a multiple of any block size: a ragged last block of scales


def _scales(n=N_SCALES, seed=0) -> torch.Tensor:
    """Positive, bunched float32 scales, like the absmax of normal weight blocks."""
    g = torch.Generator().manual_seed(seed)
    return 2.5 + 0.3 * torch.randn(n, generator=g).abs()


def _weights(n_blocks=300, seed=1) -> torch.Tensor:
    """300 blocks of 64 weights: 300 scales, a ragged last block of scales at each size here."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_blocks * 64, generator=g) * torch.linspace(0.5, 2, n_blocks).repeat_interleave(64)


@pytest.mark.parametrize("dq_block_size", DQ_BLOCKS)
def test_scales_read_back_within_half_a_code_step(dq_block_size):
    # By the definition, block by block in plain Python: each centred scale lands on the code
    # nearest to (c - offset) / absmax2, so c_hat is within half the code's widest step times
    # absmax2 of c, plus float32 rounding of the two products and the sum (a few ulp of 3).
    c = _scales()
    dq = double_quantize(c, dq_block_size)
    offset = c.mean()
    assert dq.block_size == dq_block_size and dq.absmax.shape == (-(-N_SCALES // dq_block_size),)
    c_hat = dq.dequantize()
    half_step = dynamic_map().diff().max() / 2
    for b, start in enumerate(range(0, N_SCALES, dq_block_size)):
        block = c[start:start + dq_block_size]
        absmax2 = (block - offset).abs().max()
        assert dq.absmax[b] == absmax2  # one float32 scale per block of scales: its largest |c - offset|
        err = (c_hat[start:start + dq_block_size] - block).abs()
        assert (err <= half_step * absmax2 + 4e-7).all(), (b, err.max())


@pytest.mark.parametrize("dq_block_size", DQ_BLOCKS)
def test_quantize_nf4_passes_dq_block_size_through(dq_block_size):
    w = _weights()
    q = quantize_nf4(w, double_quant=True, dq_block_size=dq_block_size)
    assert q.absmax.block_size == dq_block_size
    single = quantize_nf4(w)  # the float32 scales the 8-bit ones stand for
    assert torch.equal(q.absmax.dequantize(), double_quantize(single.absmax, dq_block_size).dequantize())
    assert q.nbytes == (w.numel() + 1) // 2 + scale_bytes(w.numel(), 64, True, dq_block_size)
    # each weight is its code's level times its block's 8-bit scale, whatever the block size
    assert torch.equal(q.codes, single.codes)
    ratio = q.dequantize().view(-1, 64) / single.dequantize().view(-1, 64)  # [blocks, 64]: c_hat / c per block
    c_hat = q.absmax.dequantize()
    nonzero = single.dequantize().view(-1, 64) != 0
    torch.testing.assert_close(ratio[nonzero], (c_hat / single.absmax)[:, None].expand_as(ratio)[nonzero],
                               rtol=3e-7, atol=0)  # 4 roundings of 2^-24: level * c, level * c_hat, both quotients


@pytest.mark.parametrize("dq_block_size", DQ_BLOCKS)
def test_lut_rounding_is_bitsandbytes_blockwise_at_every_block_size(dq_block_size):
    bnb = pytest.importorskip("bitsandbytes.functional")
    c = _scales()
    ours = double_quantize(c, dq_block_size, rounding="lut")
    offset = c.mean()
    codes, state = bnb.quantize_blockwise(c - offset, code=bnb.create_dynamic_map(signed=True),
                                          blocksize=dq_block_size)
    assert torch.equal(ours.offset, offset)
    assert torch.equal(ours.codes, codes.view(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(), bnb.dequantize_blockwise(codes, state) + offset)


def test_a_block_of_equal_scales_gets_bitsandbytes_code():
    # Scales equal to their mean centre to exactly 0 and their block's absmax2 is 0: any code
    # reads back as the offset. bitsandbytes' CPU kernel writes code 0 there; rounding="lut"
    # promises its bytes.
    bnb = pytest.importorskip("bitsandbytes.functional")
    c = torch.cat([torch.full((256,), 0.5), torch.full((128,), 0.25), torch.full((128,), 0.75)])  # mean 0.5
    ours = double_quantize(c, 256, rounding="lut")
    codes, state = bnb.quantize_blockwise(c - c.mean(), code=bnb.create_dynamic_map(signed=True), blocksize=256)
    assert ours.absmax[0] == 0 and state.absmax[0] == 0
    assert torch.equal(ours.codes, codes.view(-1))
    assert torch.equal(ours.dequantize()[:256], torch.full((256,), 0.5))