"""The fast dequantize path: a cheap _check, the cached byte table, and the Triton kernel.

QuantizedTensor._check runs on every dequantize, so it must read only types, dtypes and
shapes; the levels' values are checked once, and again only after levels is replaced or
edited in place. compiled="triton" must return the eager path's bits (on a GPU).
"""

import subprocess
import sys

import pytest
import torch

import lora_edu.quant.quantized as quantized
from lora_edu import QuantizedTensor, quantize_nf4
from lora_edu.quant.blockwise import dequantize_blockwise, unpack_nibbles
from lora_edu.quant.levels import fp4_levels


def _definition(q, dtype):
    codes = unpack_nibbles(q.codes, q.numel())
    return dequantize_blockwise(codes, q.absmax, q.levels.to(q.codes.device), q.block_size).to(dtype)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_levels_are_checked_once_until_they_change(monkeypatch):
    q = quantize_nf4(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    calls = []
    check = quantized.check_levels
    monkeypatch.setattr(quantized, "check_levels", lambda lv: calls.append(1) or check(lv))
    q.dequantize()
    q.dequantize(torch.bfloat16)
    assert calls == []  # checked when q was made, not on every call
    q.levels = q.levels.clone()  # replaced: checked again, once
    q.dequantize()
    q.dequantize()
    assert len(calls) == 1


def test_levels_edited_in_place_are_caught_and_the_table_rebuilt():
    q = quantize_nf4(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)))
    q.levels = q.levels.clone()  # (a copy of its own, so the edits below stay inside this test)
    q.dequantize()  # caches the byte table of the NF4 levels
    q.levels.copy_(fp4_levels())  # a valid table, edited in place
    assert torch.equal(_bits(q.dequantize().view(-1)), _bits(_definition(q, torch.float32)))
    q.levels.mul_(2)  # now outside [-1, 1]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        q.dequantize()


def test_check_reads_no_values():
    # meta tensors have shapes and dtypes but no data: any read of a value would fail
    codes = torch.empty(2048, dtype=torch.uint8, device="meta")
    absmax = torch.empty(64, dtype=torch.float32, device="meta")
    q = QuantizedTensor(codes, absmax, (64, 64), torch.float32)
    q._check()
    with pytest.raises(ValueError, match="one scale per block"):
        QuantizedTensor(codes, absmax[:-1], (64, 64), torch.float32)


def test_bad_compiled_values():
    q = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        q.dequantize(compiled="triton")
    with pytest.raises(ValueError, match='False, True, "triton" \\(CUDA\\) or "cpp" \\(CPU\\)'):
        q.dequantize(compiled="cuda")


def test_eager_dequantize_imports_neither_dynamo_nor_triton():
    code = ("import sys, torch, lora_edu; lora_edu.quantize_nf4(torch.randn(64, 64)).dequantize(); "
            "print('torch._dynamo' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA tensors")
@pytest.mark.parametrize("shape, block", [((64, 128), 64), ((1000, 32), 32), ((7, 256), 256), ((3, 70), 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_dequantize_is_the_eager_one_bit_for_bit(shape, block, dtype, double_quant):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    w = (3 * torch.randn(shape, generator=g)).cuda()
    q = quantize_nf4(w, block, double_quant=double_quant and w.numel() // block >= 2)
    assert torch.equal(_bits(q.dequantize(dtype, compiled="triton")), _bits(q.dequantize(dtype)))


def _can_build_extensions() -> bool:
    import os
    import shutil
    import sysconfig
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    return bool(shutil.which("c++") and shutil.which("ninja") and os.path.exists(headers))


@pytest.mark.skipif(not _can_build_extensions(), reason="compiled='cpp' needs a C++ compiler, ninja and Python.h")
@pytest.mark.parametrize("shape, block", [((64, 128), 64), ((1000, 32), 32), ((7, 256), 256), ((3, 70), 64),
                                          ((2, 2048), 2048), ((64, 64), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_cpp_dequantize_is_the_eager_one_bit_for_bit(shape, block, dtype, double_quant):
    """The C++ kernel (built once per machine): whole blocks, a ragged last block, blocks over 512 weights."""
    g = torch.Generator().manual_seed(0)
    w = 3 * torch.randn(shape, generator=g)
    q = quantize_nf4(w, block, double_quant=double_quant and w.numel() // block >= 2)
    assert torch.equal(_bits(q.dequantize(dtype, compiled="cpp")), _bits(q.dequantize(dtype)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks the message for CUDA tensors")
def test_cpp_refuses_cuda_tensors():
    with pytest.raises(ValueError, match="CPU tensors only"):
        quantize_nf4(torch.randn(8, 64).cuda()).dequantize(compiled="cpp")
