"""The peak of a training step on a GPU, predicted phase by phase from the ledger.

The ledger (lora_edu.memory.ledger) adds up its terms, which never all exist at once, and
leaves out the step's temporaries. A GPU's peak (torch.cuda.max_memory_allocated) can be
smaller than that sum, because gradients and
activations never all live at once: the backward frees each layer's activations as it
produces that layer's gradients. It is also larger in places, because PyTorch makes
temporaries the textbook ledger does not list. This module names those temporaries and
takes the peak as the largest of three moments of one step (the optimizer's states exist
from the step before; gradients are cleared with set_to_none before the forward):

    end of forward     resident + saved activations + the logits [tokens, vocab]
    loss backward      resident + saved activations + two more [tokens, vocab] tensors:
                       the gradient of the log-probabilities and that of the logits
    optimizer step     resident + every gradient + the step's temporaries of the largest
                       parameter (lora_edu.Adam: sqrt(v) and its quotient, plus the
                       gradient upcast to float32 under master weights)

Under gradient checkpointing a fourth moment comes later in the backward: the checkpoints
plus one layer rebuilt (and, at most, every gradient). QLoRA (and QDoRA) adds one
dequantized weight, the largest, which exists for the length of one matmul. "resident" is
weights, master copies, optimizer states and quantization constants, plus two terms the
textbook ledger lacks: cuBLAS keeps a workspace for each thread that runs matmuls, the
forward's and autograd's backward thread, 32 MiB each on an H200 (code/measure_memory.py
measures it; other GPUs and libraries differ); and a DoRA layer caches ||W0||^2 per output
row of its frozen base, float32 [out], from one step to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

from .activations import DORA_METHODS, NF4_METHODS
from .ledger import ACTIVATION_BYTES, POLICIES, estimate_memory
from .spec import linear_shapes


CUBLAS_WORKSPACES = 2 * 32 * 2**20  # two threads' cuBLAS workspaces, as measured on an H200


@dataclass
class Peak:
    """The predicted moments of a step, each a dict of named bytes; .total is the largest."""

    resident: float  # bytes that live across steps, workspaces included
    moments: dict  # moment -> {term: bytes}, resident bytes not included

    @property
    def moment(self) -> str:
        return max(self.moments, key=lambda m: sum(self.moments[m].values()))

    @property
    def total(self) -> float:
        return self.resident + sum(self.moments[self.moment].values())


def _largest_param(spec, method, targets, r) -> int:
    """Elements of the largest trained tensor: an embedding or lm_head matrix, or one LoRA factor.

    DoRA's magnitude [d] never outgrows its layer's factors, B [d, r] and A [r, k]: d <= max(d, k) * r
    for every r >= 1 (a tie at r = 1 and d >= k, which gives the same maximum).
    """
    if method == "full":
        return max(spec.vocab_size * spec.hidden_size, *(d * k for d, k in linear_shapes(spec, "all-linear")))
    return max(max(d, k) * r for d, k in linear_shapes(spec, targets))


def _dora_norm_cache(spec, method, targets) -> int:
    """Bytes of DoRA's cached ||W0||^2: float32 [d] per adapted [d, k] linear (DoRALinear._w0_cache)."""
    if method not in DORA_METHODS:
        return 0
    return 4 * sum(d for d, _ in linear_shapes(spec, targets))


def estimate_peak(spec, method: str = "full", policy: str = "mixed_fp32_master", adapter_policy: str | None = None,
                  r: int = 8, targets=("q", "k", "v", "o"), batch: int = 1, seq_len: int = 1,
                  checkpointing: bool = False, block_size: int = 64, double_quant: bool = True,
                  workspace_bytes: int = CUBLAS_WORKSPACES) -> Peak:
    """Predicted torch.cuda.max_memory_allocated of one Adam step, by moment (see the module docstring)."""
    led = estimate_memory(spec, method, policy, "adam", r, targets, block_size, double_quant, batch, seq_len,
                          checkpointing, adapter_policy)
    e = ACTIVATION_BYTES[policy]
    resident = (led.weights + led.master_weights + led.optimizer_states + led.quant_constants
                + led.lora_weights + led.lora_master_weights + led.lora_optimizer_states + workspace_bytes
                + _dora_norm_cache(spec, method, targets))
    logits = batch * seq_len * spec.vocab_size * e
    trained_policy = policy if method == "full" else (adapter_policy or policy)
    w, g, m, s = POLICIES[trained_policy]
    largest = _largest_param(spec, method, targets, r)
    state_bytes = 4 if m else s  # under master weights the step runs in float32
    step_temps = largest * state_bytes * (3 if m else 2)
    moments = {
        "end of forward": {"activations": led.activations, "logits": logits},
        "loss backward": {"activations": led.activations, "logit gradients": 2 * logits},
        "optimizer step": {"gradients": led.gradients + led.lora_gradients, "step temporaries": step_temps},
    }
    if checkpointing:  # the log-probs are gone by then; every gradient is an upper bound
        moments["layer rebuilt in backward"] = {
            "checkpoints": led.activations - led.activation_terms["loss"],
            "recomputed layer": led.recomputed_layer, "gradients": led.gradients + led.lora_gradients}
    if method in NF4_METHODS:  # one weight dequantized to the compute dtype for the length of a matmul
        biggest = max(d * k for d, k in linear_shapes(spec, "all-linear")) * e
        moments["end of forward"]["dequantized weight"] = biggest
    return Peak(resident, moments)

