"""TinyLlama and its synthetic task: shapes, names, causality, determinism, and the
pretrain-then-LoRA-fine-tune recipe that later chapters rely on."""

from __future__ import annotations

import pytest
import torch

from lora_edu import count_trainable_params, inject_lora, lora_param_count
from lora_edu.tiny.tasks import FINETUNE, PRETRAIN, Task, entropy_floor, make_batches
from lora_edu.tiny.model import (LLAMA_TARGETS, TinyConfig, TinyLlama, evaluate,
                                       pretrained_model, train)


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLlama(TinyConfig(**kw))


def test_logits_shape():
    model = small_model()
    ids = torch.randint(32, (3, 17))
    assert model(ids).shape == (3, 17, 32)


def test_llama_module_names():
    cfg = TinyConfig()
    names = dict(TinyLlama(cfg).named_modules())
    for i in range(cfg.n_layer):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(names[f"layers.{i}.self_attn.{proj}"], torch.nn.Linear)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert isinstance(names[f"layers.{i}.mlp.{proj}"], torch.nn.Linear)
    assert names["layers.0.mlp.gate_proj"].weight.shape == (cfg.d_ff, cfg.d_model)
    assert {"embed_tokens", "norm", "lm_head"} <= set(names)


def test_causal():
    model = small_model()
    ids = torch.randint(32, (2, 20))
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 32
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])  # earlier positions cannot see token 12
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_tied_embeddings_share_one_tensor():
    model = small_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_make_batches_deterministic():
    a = make_batches(PRETRAIN, 3, seed=7)
    assert a.shape == (3, 32, PRETRAIN.seq_len + 1)
    assert torch.equal(a, make_batches(PRETRAIN, 3, seed=7))
    assert not torch.equal(a, make_batches(PRETRAIN, 3, seed=8))
    assert int(a.min()) >= 0 and int(a.max()) < PRETRAIN.vocab_size


def test_noiseless_task_follows_its_rule():
    task = Task(steps=(5,), noise=0.0)
    x = make_batches(task, 1, seed=0)[0]  # [B, T + 1]
    assert torch.equal((x[:, 1:] - x[:, :-1]) % task.vocab_size, torch.full_like(x[:, 1:], 5))
    assert entropy_floor(task) == 0.0


def test_training_is_deterministic():
    runs = []
    for _ in range(2):
        model = small_model(seed=3)
        runs.append(train(model, PRETRAIN, steps=5, seed=11, progress=False))
    assert runs[0] == runs[1]  # bit-identical floats


def test_short_pretrain_lowers_loss():
    model = small_model()
    before = evaluate(model, PRETRAIN, n_batches=2)
    train(model, PRETRAIN, steps=60, seed=0, progress=False)
    assert evaluate(model, PRETRAIN, n_batches=2) < before - 1.0


def test_pretrained_model_is_cached_copy():
    a, b = pretrained_model(), pretrained_model()
    assert a is not b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # the pretrained base is good on P, worse on the shifted task Q
    loss_p, loss_q = evaluate(a, PRETRAIN, n_batches=2), evaluate(a, FINETUNE, n_batches=2)
    assert loss_p < 1.0 < loss_q


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], list(LLAMA_TARGETS)])
def test_inject_lora_trainable_count(targets):
    model = small_model()
    shapes = [tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    assert len(shapes) == len(targets) * model.config.n_layer
    inject_lora(model, targets, r=4, alpha=8)
    assert count_trainable_params(model) == lora_param_count(shapes, r=4)


def test_lora_finetune_on_shifted_task_lowers_its_loss():
    model = pretrained_model()
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    before = evaluate(model, FINETUNE, n_batches=2)
    train(model, FINETUNE, steps=60, seed=1, progress=False)
    assert evaluate(model, FINETUNE, n_batches=2) < before - 0.3


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=60, n_head=8), "divisible"),
    (dict(d_model=0), "d_model"),
    (dict(n_layer=-1), "n_layer"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(d_model=12, n_head=4), "even"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        TinyConfig(**kw)


def test_bad_task_and_mismatch_raise():
    with pytest.raises(ValueError, match="steps"):
        Task(steps=(0,))
    with pytest.raises(ValueError, match="noise"):
        Task(noise=1.0)
    with pytest.raises(ValueError, match="does not fit"):
        pretrained_model(TinyConfig(vocab_size=16))
    with pytest.raises(ValueError, match="block_size"):
        small_model(block_size=8)(torch.zeros(1, 9, dtype=torch.long))


# ------------------------------------------------------------------ fast checks of the helpers
def test_evaluate_restores_the_training_mode():
    model = small_model(n_layer=1)
    task = Task(seq_len=8)
    for mode in (True, False):
        model.train(mode)
        evaluate(model, task, n_batches=1, batch_size=4)
        assert model.training is mode and all(m.training is mode for m in model.modules())


def test_train_seeds_lora_dropout():
    # train(seed=...) draws both the batches and, through the global RNG, LoRA's dropout
    # masks, so a run is reproducible whatever the RNG held before it. Three steps: at step 1
    # B = 0 hides the mask from the loss, but not from B's gradient.
    task = Task(seq_len=8)
    runs = []
    for before in (0, 1):
        model = small_model(seed=3, n_layer=1)
        inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.5)
        torch.manual_seed(before)  # a different global RNG state before each run
        runs.append(train(model, task, steps=3, seed=11, batch_size=8, progress=False))
    assert runs[0] == runs[1]


def test_entropy_floor_is_the_noise_entropy():
    import math

    from torch.distributions import Categorical

    task = Task(steps=(5,), noise=0.1)  # one step: the ideal predictor knows s exactly
    V, e = task.vocab_size, task.noise
    # The ideal predictive distribution: the rule's token with 1 - e, plus e spread over all V
    # (the rule's token included), written as a distribution and handed to torch.distributions.
    probs = torch.full((V,), e / V, dtype=torch.float64)
    probs[0] += 1 - e
    assert math.isclose(entropy_floor(task), Categorical(probs=probs).entropy().item(), rel_tol=1e-12)
    # and the sampler follows that distribution: the ideal predictor's mean loss on 16,384
    # sampled tokens. Per token the loss is 0.10 or 5.77 (rule token or not), std 1.7, so the
    # mean's standard error is 1.7 / 128 = 0.013; allow four.
    x = make_batches(task, 16, seed=5)  # [16, 32, T + 1]
    rule = (x[..., :-1] + 5) % V == x[..., 1:]
    nll = torch.where(rule, -math.log(1 - e + e / V), -math.log(e / V))
    assert abs(nll.double().mean().item() - entropy_floor(task)) < 4 * 0.013
