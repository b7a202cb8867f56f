"""A LLaMA-shaped decoder small enough to pretrain and fine-tune on a 2-core CPU in seconds.

Architecture of Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models",
arXiv 2302.13971, with the same module names as Hugging Face's LlamaForCausalLM, so target
lists written for real checkpoints ("q_proj", "v_proj", ...) work here unchanged:

    x = embed_tokens(ids)
    per layer:  x = x + o_proj(attention(q_proj(n), k_proj(n), v_proj(n))),  n = input_layernorm(x)
                x = x + down_proj(silu(gate_proj(n)) * up_proj(n)),          n = post_attention_layernorm(x)
    logits = lm_head(norm(x))

RMSNorm: Zhang and Sennrich 2019, arXiv 1910.07467,  y = x / sqrt(mean(x^2) + eps) * weight.
SwiGLU: Shazeer 2020, arXiv 2002.05202.  Rotary position embeddings (RoPE): Su et al. 2021,
arXiv 2104.09864; they rotate q and k by a position-dependent angle and have no parameters,
so every trainable weight of this model is an embedding, a norm or an nn.Linear without bias.
Production code (KV cache, grouped-query attention, fused kernels) is in HF transformers.

The recipe later chapters use: `pretrained_model()` trains a base on lora_edu.tiny.tasks.PRETRAIN
for a few seconds; inject_lora + `train` then fine-tunes it on the shifted FINETUNE task.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..train.adam import Adam
from ..train.checkpointing import checkpoint
from .tasks import PRETRAIN, Task, make_batches

#: every nn.Linear inside the decoder layers ("all-linear" in HF PEFT, which skips lm_head too)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)  # frozen: hashable, so it can key pretrained_model's cache
class TinyConfig:
    vocab_size: int = 32  # tokens; must match the task's vocab_size
    block_size: int = 32  # longest sequence; RoPE angles are precomputed up to here
    n_layer: int = 2  # decoder layers
    n_head: int = 4  # attention heads; head size = d_model // n_head
    d_model: int = 64  # width of the residual stream (hidden_size in HF)
    d_ff: int = 172  # SwiGLU hidden width (intermediate_size), about 8/3 * d_model as in LLaMA
    norm_eps: float = 1e-5  # RMSNorm eps (rms_norm_eps in HF)
    rope_theta: float = 10000.0  # RoPE base; larger means slower rotation, for longer contexts
    tie_embeddings: bool = False  # share lm_head.weight with embed_tokens.weight (LLaMA does not)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}): "
                             "each head gets d_model // n_head dimensions")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head size d_model // n_head = {self.d_model // self.n_head} must be even: "
                             "RoPE rotates pairs of dimensions")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean and the bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # [dim]

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cos_sin(head_dim: int, block_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle pos * theta^(-2i / head_dim), each [block_size, head_dim]."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)  # [head_dim / 2]
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # [block_size, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [block_size, head_dim], HF's "rotate_half" layout
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i + hs/2}) of x [B, nh, T, hs] by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)  # [B, nh, T, hs/2] each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # [B, nh, T, hs]


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE on q and k."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # [d_model, d_model]
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape  # [batch, seq, d_model]
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, nh, T, hs]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, nh, T, hs]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # [B, T, d_model]


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # [d_ff, d_model]
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # [d_ff, d_model]
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)  # [d_model, d_ff]

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [..., d_model]


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """token ids [batch, seq] -> logits [batch, seq, vocab_size]."""

    def __init__(self, cfg: TinyConfig = TinyConfig()):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False  # True: keep only each layer's input for backward (see checkpointing.py)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)  # [vocab, d_model]
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # [vocab, d_model]
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cos_sin(cfg.d_model // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [block_size, head_dim]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):  # GPT-2 / LLaMA style: N(0, 0.02)
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, ids):
        B, T = ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.embed_tokens(ids)  # [B, T, d_model]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # [T, head_dim]
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin)  # [B, T, d_model], activations rebuilt in backward
            else:
                x = layer(x, cos, sin)  # [B, T, d_model]
        return self.lm_head(self.norm(x))  # [B, T, vocab]


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a batch [B, T + 1]: predict batch[:, 1:] from batch[:, :-1]."""
    logits = model(batch[:, :-1])  # [B, T, vocab]
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def train(model: nn.Module, data, steps: int, lr: float = 3e-3, seed: int = 0, optimizer="adam",
          batch_size: int = 32, progress: bool = True, callback=None, regularizer=None) -> list[float]:
    """Train the parameters that require grad for `steps` steps; return the loss of each step.

    data: a Task (fresh batches drawn with `seed`) or a tensor of batches [n, B, T + 1],
    cycled. optimizer: "adam" (lora_edu.Adam, not torch.optim, which costs a second to
    construct) or an already-built optimizer over the model's trainable parameters.
    Same model, data and seed on the same machine give bit-identical losses. Leaves the
    model in eval mode. callback(step, model), if given, runs after each optimizer step
    (step counts from 1), under no_grad: to record weights along the way; the gradients of
    that step are still in p.grad (AdaLoRA's rank allocator reads them there).
    regularizer(model), if given, is added to the loss that is differentiated (AdaLoRA's
    orthogonality penalty); the losses returned are the task's alone.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    torch.manual_seed(seed)  # anything stochastic inside the model (LoRA dropout) follows the seed
    batches = make_batches(data, steps, seed, batch_size) if isinstance(data, Task) else data
    if optimizer == "adam":
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = Adam(params, lr=lr)
    elif isinstance(optimizer, str):
        raise ValueError(f"optimizer must be 'adam' or an optimizer object, got {optimizer!r}")
    model.train()
    losses = []
    from tqdm.auto import tqdm  # imported here: tqdm.auto looks for ipywidgets, which costs time at import

    bar = tqdm(range(steps), disable=not progress, desc="train", leave=False)
    for step in bar:
        loss = lm_loss(model, batches[step % len(batches)])
        optimizer.zero_grad()
        (loss if regularizer is None else loss + regularizer(model)).backward()
        optimizer.step()
        losses.append(loss.item())
        if callback is not None:
            with torch.no_grad():
                callback(step + 1, model)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, n_batches: int = 8, seed: int = 1234, batch_size: int = 64) -> float:
    """Mean next-token loss on held-out batches (a seed that training does not use by default)."""
    was_training = model.training
    model.eval()
    batches = make_batches(task, n_batches, seed, batch_size)
    loss = sum(lm_loss(model, b).item() for b in batches) / n_batches
    model.train(was_training)
    return loss


@functools.lru_cache(maxsize=8)
def _pretrain(config: TinyConfig, task: Task, seed: int, steps: int, lr: float) -> TinyLlama:
    torch.manual_seed(seed)  # the initial weights
    model = TinyLlama(config)
    train(model, task, steps, lr=lr, seed=seed, progress=False)
    return model


def pretrained_model(config: TinyConfig | None = None, seed: int = 0, steps: int = 200,
                     lr: float = 3e-3, task: Task = PRETRAIN) -> TinyLlama:
    """A TinyLlama pretrained on `task` (rule P), in eval mode, all parameters trainable.

    Cached per argument set in this process: each call returns a fresh deepcopy, so a
    notebook may inject adapters into it without touching the cached base.
    """
    config = config or TinyConfig()
    if task.vocab_size != config.vocab_size or task.seq_len > config.block_size:
        raise ValueError(f"task (vocab {task.vocab_size}, seq_len {task.seq_len}) does not fit the model "
                         f"(vocab_size {config.vocab_size}, block_size {config.block_size})")
    return copy.deepcopy(_pretrain(config, task, seed, steps, lr))
