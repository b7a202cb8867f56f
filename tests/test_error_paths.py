"""The error paths that no module's own test file reached: each raise, triggered, with its message.

An audit of every `raise` in lora_edu (the adapter-file modules methods/adapters.py, peft_files.py
and safe_files.py aside, which their own tests cover) against the suite found these twelve never
triggered, plus two checks whose message was tested but whose condition was not (alpha=True, a
one-level table). Each test names the message it expects, so a raise that fires for the wrong
reason fails too.
"""

import dataclasses
import re

import pytest
import torch

from lora_edu import (PRETRAIN, TinyConfig, TinyLlama, check_lora_hparams, inject_lora, prepare_qlora,
                      quantize_4bit, quantize_nf4)
from lora_edu.experiments.subspace import top_directions
from lora_edu.quant import blockwise
from lora_edu.quant.blockwise import check_levels
from lora_edu.quant.quantized import QuantizedTensor
from lora_edu.tiny.model import train
from lora_edu.tiny.tasks import Task, make_batches


def _q():
    return quantize_nf4(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------ methods
def test_alpha_true_is_not_alpha_one():
    with pytest.raises(ValueError, match=r"alpha must be a positive, finite number .*got alpha=True"):
        check_lora_hparams(8, True)


# ------------------------------------------------------------------ quant
def test_levels_that_are_not_a_tensor():
    with pytest.raises(TypeError, match=r"levels must be a 1-D float tensor, e\.g\. nf4_levels\(\)"):
        quantize_4bit(torch.randn(64), [i / 15 for i in range(16)])


def test_a_table_of_one_level():
    with pytest.raises(ValueError, match=r"levels must hold at least 2 values in \[-1, 1\], sorted ascending"):
        check_levels(torch.zeros(1))


def test_quantized_tensor_with_an_integer_dtype():
    with pytest.raises(TypeError, match=r"dtype must be float32, float16 or bfloat16, got torch\.int8"):
        dataclasses.replace(_q(), dtype=torch.int8)


def test_quantized_tensor_with_an_8_level_table():
    # quantize_4bit refuses such a table up front; a QuantizedTensor given one later must too
    with pytest.raises(ValueError, match=r"a 4-bit code table has 16 levels, got 8"):
        dataclasses.replace(_q(), levels=torch.linspace(-1, 1, 8))


def test_cpp_kernel_refuses_tensors_off_the_cpu():
    # meta tensors have a device but no data: the device check must come before any kernel runs
    q = _q()
    meta = QuantizedTensor(q.codes.to("meta"), q.absmax.to("meta"), q.shape, q.dtype)
    with pytest.raises(ValueError, match=r'compiled="cpp" runs on CPU tensors only, got meta'):
        meta.dequantize(compiled="cpp")


def test_a_failed_cpp_build_says_what_it_needs(monkeypatch, capsys):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise OSError("no c++ compiler found")

    monkeypatch.setattr(blockwise, "_cpp_kernel", None)  # as on a machine that never built it
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.raises(RuntimeError, match=re.escape('compiled="cpp" builds a C++ kernel with '
                                                     "torch.utils.cpp_extension, which failed (OSError: no c++ "
                                                     "compiler found); it needs a C++ compiler, ninja")):
        _q().dequantize(compiled="cpp")
    assert "building the C++ NF4 kernel" in capsys.readouterr().err


def test_prepare_qlora_on_a_model_that_has_adapters():
    model = inject_lora(TinyLlama(TinyConfig(n_layer=1)), ["q_proj"], r=2)
    with pytest.raises(ValueError, match=r"this model already has LoRA layers; prepare_qlora takes a plain base model"):
        prepare_qlora(model, ["v_proj"])


# ------------------------------------------------------------------ tiny
def test_train_needs_positive_steps_and_a_known_optimizer():
    model = TinyLlama(TinyConfig(n_layer=1))
    with pytest.raises(ValueError, match=r"steps must be positive, got 0"):
        train(model, PRETRAIN, steps=0, progress=False)
    with pytest.raises(ValueError, match=r"optimizer must be 'adam' or an optimizer object, got 'sgd'"):
        train(model, Task(seq_len=8), steps=1, batch_size=2, optimizer="sgd", progress=False)


def test_make_batches_needs_batches():
    with pytest.raises(ValueError, match=r"make_batches needs n > 0 and batch_size > 0, got n=0, batch_size=32"):
        make_batches(PRETRAIN, 0, seed=0)
    with pytest.raises(ValueError, match=r"make_batches needs n > 0 and batch_size > 0, got n=1, batch_size=0"):
        make_batches(PRETRAIN, 1, seed=0, batch_size=0)


def test_task_needs_two_tokens_and_two_positions():
    with pytest.raises(ValueError, match=r"Task needs vocab_size >= 2 and seq_len >= 2, got 1, 32"):
        Task(vocab_size=1)
    with pytest.raises(ValueError, match=r"Task needs vocab_size >= 2 and seq_len >= 2, got 32, 1"):
        Task(seq_len=1)


# ------------------------------------------------------------------ experiments
def test_top_directions_needs_k_within_the_rank():
    with pytest.raises(ValueError, match=r"k must be between 1 and min\(out, in\) = 3, got 4"):
        top_directions(torch.ones(4, 3), 4)
    with pytest.raises(ValueError, match=r"k must be between 1 and min\(out, in\) = 3, got 0"):
        top_directions(torch.ones(4, 3), 0)

# ------------------------------------------------------------------ teaching
def test_frame_player_notices_a_changed_matplotlib_template():
    # frame_player edits the HTML of matplotlib's to_jshtml; a template without the expected
    # tags must stop with an error rather than ship a player without its text alternatives
    pytest.importorskip("matplotlib")
    from lora_edu.teaching.plots import _accessible

    player = '<img id="_anim_imgabc123">'  # to_jshtml's image, but no <div class="animation"> around it
    with pytest.raises(RuntimeError, match=re.escape("""matplotlib's to_jshtml template changed: """
                                                     """'<div class="animation">' is not in it once""")):
        _accessible(player, "A figure.", ["Frame 1 of 1"])
