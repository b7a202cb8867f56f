"""TinyLlama against Hugging Face's LlamaForCausalLM: the same weights give the same logits and loss.

lora_edu.tiny.model writes LLaMA out (RMSNorm, RoPE in HF's rotate-half layout, causal
attention, SwiGLU, pre-norm residuals) with HF's module names, so HF's model loads our state
dict key for key (with its "model." prefix). HF's eager attention computes the softmax
explicitly where ours calls scaled_dot_product_attention, and HF takes RoPE's frequencies as
1 / theta^(2i/d) where ours takes theta^(-2i/d): two independent writings of the same model.

The weights are drawn at std 0.1 instead of the model's 0.02, so that attention is far from
uniform and every part of the layer moves the logits by O(1): a wrong norm, rotation or
wiring cannot hide under the tolerance.
"""

import pytest
import torch

from lora_edu.tiny.model import TinyConfig, TinyLlama, lm_loss

transformers = pytest.importorskip("transformers")  # installed with peft; the import takes a few seconds

CFG = TinyConfig()


def _models():
    torch.manual_seed(0)
    ours = TinyLlama(CFG).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            norm = name.endswith("norm.weight")  # RMSNorm gains near 1, everything else N(0, 0.1)
            p.copy_((1 if norm else 0) + 0.1 * torch.randn(p.shape, generator=g))
    config = transformers.LlamaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, intermediate_size=CFG.d_ff,
        num_hidden_layers=CFG.n_layer, num_attention_heads=CFG.n_head, num_key_value_heads=CFG.n_head,
        rms_norm_eps=CFG.norm_eps, rope_theta=CFG.rope_theta, max_position_embeddings=CFG.block_size + 1,
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        attn_implementation="eager")
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.load_state_dict({("" if k.startswith("lm_head") else "model.") + k: v
                            for k, v in ours.state_dict().items()}, strict=True)
    return ours, theirs


def _ids(seq_len, seed=2):
    return torch.randint(0, CFG.vocab_size, (3, seq_len), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_hf_llama():
    ours, theirs = _models()
    ids = _ids(CFG.block_size)
    with torch.no_grad():
        y_ours, y_theirs = ours(ids), theirs(ids).logits  # [3, 32, vocab]
    # Tolerance: both run in float32 with their own operation order. Each matmul adds up at
    # most d_ff = 172 products, so carries at most 172 U32 (1e-5) relative of its |x| |W|;
    # about ten such steps in a row, with magnitudes of order one, stay within 1e-4 of the
    # logits' scale. (Measured: 2e-6.) A changed norm, rotation or wiring moves them by O(1).
    scale = y_theirs.abs().max()
    assert 1 < scale < 10  # weights large enough to matter, logits still of order one
    assert (y_ours - y_theirs).abs().max() <= 1e-4 * scale
    # the rotation matters here: without it (position-free attention) the logits are far off
    with torch.no_grad():
        no_rope = TinyLlama(CFG).eval()
        no_rope.load_state_dict(ours.state_dict())
        no_rope.rope_cos.fill_(1.0)
        no_rope.rope_sin.fill_(0.0)
        assert (no_rope(ids) - y_theirs).abs().max() > 100 * 1e-4 * scale


def test_lm_loss_is_hf_next_token_loss():
    # HF's labels=ids shifts inside the model: it predicts ids[:, 1:] from the logits of
    # ids[:, :-1]. lm_loss does the shift itself on a [batch, T + 1] batch. Causal attention
    # makes the logits of ids[:, :-1] the same whether or not the last token is fed in.
    ours, theirs = _models()
    batch = _ids(CFG.block_size + 1, seed=3)  # [3, T + 1]
    with torch.no_grad():
        ours_loss, hf_loss = lm_loss(ours, batch), theirs(input_ids=batch, labels=batch).loss
    # tolerance: the logits' 1e-4 relative above, through a log-softmax of 32 terms
    assert abs(ours_loss.item() - hf_loss.item()) <= 1e-4 * hf_loss.item()
    assert hf_loss.item() > 0.5  # random weights: far from a perfect prediction