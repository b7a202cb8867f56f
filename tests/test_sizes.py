"""lora_edu.quant.sizes: the byte and bit counts the memory ledger uses equal what quantized tensors hold."""

import pytest
import torch

from lora_edu import quantize_nf4
from lora_edu.quant.sizes import bits_per_param, scale_bytes


@pytest.mark.parametrize("numel", [64, 64 * 256, 64 * 300 + 5, 7, 64 * 513])  # ragged blocks and dq blocks
@pytest.mark.parametrize("double_quant", [False, True])
def test_scale_bytes_equal_the_scales_a_quantized_tensor_holds(numel, double_quant):
    q = quantize_nf4(torch.randn(numel, generator=torch.Generator().manual_seed(numel)), double_quant=double_quant)
    codes = (numel + 1) // 2  # two 4-bit codes per byte
    assert scale_bytes(numel, 64, double_quant) == q.nbytes - codes


def test_scale_bytes_by_hand():
    assert scale_bytes(64 * 300, 64) == 4 * 300  # one float32 absmax per block
    # 300 uint8 codes, 2 float32 scales (blocks 1-256 and 257-300) and the float32 offset
    assert scale_bytes(64 * 300, 64, double_quant=True) == 300 + 2 * 4 + 4


@pytest.mark.parametrize("dq_block_size", [64, 128, 512])
def test_other_second_level_block_sizes(dq_block_size):
    # 8-bit codes (8 / 64 bit per weight) and one float32 per dq_block_size codes
    assert bits_per_param(64, True, dq_block_size) == 4 + 8 / 64 + 32 / (64 * dq_block_size)
    n = 64 * 1000  # 1000 scales: a ragged last block of scales at every block size here
    q = quantize_nf4(torch.randn(n, generator=torch.Generator().manual_seed(0)), double_quant=True,
                     dq_block_size=dq_block_size)
    assert q.absmax.block_size == dq_block_size
    assert scale_bytes(n, 64, True, dq_block_size) == q.nbytes - n // 2 == 1000 + 4 * -(-1000 // dq_block_size) + 4


def test_bits_per_param_of_qlora():
    assert bits_per_param(64) == 4.5
    assert bits_per_param(64, double_quant=True) == pytest.approx(4.127, abs=1e-3)  # QLoRA paper, section 3
    with pytest.raises(ValueError, match="power of two"):
        bits_per_param(48)
