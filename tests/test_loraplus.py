"""LoRA+ groups against HF PEFT's create_loraplus_optimizer, and their steps against torch's AdamW.

Two models: the test TinyModel with DoRA on q_proj/v_proj, LoRA on mlp.fc1, and trainable
biases, nn.LayerNorm's, the head's weight and the embedding (every rule of PEFT's: A, B,
1-D, "bias" names, LayerNorm), and the tiny LLaMA with DoRA on q/v and its RMSNorm gains
trainable (a norm that PEFT's LayerNorm test does not know, so it is decayed).
"""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")  # the import takes a few seconds; once per module
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

from _models import assert_unchanged, make_model, snapshot, token_ids  # noqa: E402
from lora_edu import LoRALinear, TinyConfig, TinyLlama, inject_lora, load_adapter, save_adapter  # noqa: E402
from lora_edu.train.loraplus import loraplus_optimizer, loraplus_param_groups  # noqa: E402

LR, RATIO = 1e-3, 16


def mixed_model() -> nn.Module:
    model = inject_lora(make_model(), ["q_proj", "v_proj"], r=4, alpha=8, dora=True)
    for block in model.layers:
        block.mlp.fc1 = LoRALinear(block.mlp.fc1, r=4, alpha=8)  # plain LoRA beside the DoRA layers
        block.norm.requires_grad_(True)  # LayerNorm weight and bias: 1-D, not decayed
        block.attn.q_proj.base.bias.requires_grad_(True)  # a base bias inside an adapter layer
    model.head.requires_grad_(True)  # a 2-D non-B weight (A's group) and a bias
    model.embed.requires_grad_(True)  # a plain embedding, fully trained: A's group too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)  # as after training, so that every gradient is non-zero
    return model


def llama_model() -> nn.Module:
    torch.manual_seed(0)
    model = inject_lora(TinyLlama(TinyConfig()), ["q_proj", "v_proj"], r=4, dora=True)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)  # RMSNorm gains, 1-D
    return model


def llama_batch():
    return torch.randint(0, TinyConfig().vocab_size, (4, 9), generator=torch.Generator().manual_seed(1))


MODELS = {"mixed": (mixed_model, token_ids), "llama": (llama_model, llama_batch)}


def peft_groups(model, weight_decay):
    opt = create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    loraplus_weight_decay=weight_decay, foreach=False)
    return opt, [g for g in opt.param_groups if g["params"]]  # PEFT keeps empty groups; they step nothing


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("which", MODELS)
def test_peft_mode_gives_peft_groups(which, weight_decay):
    model = MODELS[which][0]()
    ours = loraplus_param_groups(model, LR, RATIO, weight_decay=weight_decay, one_d_as_b=True)
    theirs = peft_groups(model, weight_decay)[1]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert (a["lr"], a["weight_decay"]) == (b["lr"], b["weight_decay"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for g in ours for p in g["params"]) == sorted(map(id, trainable))


def test_peft_mode_puts_magnitude_and_norms_at_ratio_times_lr():
    """The rules written out by hand, on the mixed model (PEFT's own groups are checked above)."""
    model = mixed_model()
    groups = loraplus_param_groups(model, LR, RATIO, weight_decay=0.1, one_d_as_b=True)
    got = {name: (g["lr"], g["weight_decay"]) for g in groups for name, p in model.named_parameters()
           if any(p is q for q in g["params"])}
    assert got["layers.0.attn.q_proj.magnitude"] == (LR * RATIO, 0.1)
    assert got["layers.0.attn.q_proj.lora_B"] == (LR * RATIO, 0.1)
    assert got["layers.0.attn.q_proj.lora_A"] == (LR, 0.1)
    assert got["layers.0.norm.weight"] == got["layers.0.norm.bias"] == (LR * RATIO, 0.0)  # LayerNorm: no decay
    assert got["layers.0.attn.q_proj.base.bias"] == got["head.bias"] == (LR * RATIO, 0.0)
    assert got["head.weight"] == got["embed.weight"] == (LR, 0.1)


def test_default_keeps_every_1d_tensor_at_lr():
    model = mixed_model()
    groups = loraplus_param_groups(model, LR, RATIO, weight_decay=0.1)
    for g in groups:
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            leaf = name.rsplit(".", 1)[-1]
            no_decay = leaf == "bias" or ".norm." in name  # the biases and the LayerNorms
            assert g["lr"] == (LR * RATIO if leaf == "lora_B" else LR), name
            assert g["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert [g["name"] for g in groups] == ["A", "A, no decay", "B"]


def _steps(model, opt, batch, n=4):
    for _ in range(n):
        opt.zero_grad()
        model(batch).float().square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("which", MODELS)
def test_steps_equal_peft_adamw_bit_for_bit(which):
    make, batch = MODELS[which]
    model = make()
    start = [p.detach().clone() for p in model.parameters()]
    twin = copy.deepcopy(model)
    ours = _steps(model, loraplus_optimizer(model, LR, RATIO, weight_decay=0.1, one_d_as_b=True), batch())
    theirs = _steps(twin, peft_groups(twin, 0.1)[0], batch())
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    moved = sum(not torch.equal(a, b) for a, b in zip(ours, start))
    assert moved == sum(p.requires_grad for p in model.parameters())  # every trainable tensor stepped


def test_default_mode_trains_the_magnitude_slower_than_peft():
    model = mixed_model()
    twin = copy.deepcopy(model)
    ours = dict(zip([n for n, _ in model.named_parameters()], _steps(model, loraplus_optimizer(model, LR), token_ids())))
    theirs = dict(zip([n for n, _ in twin.named_parameters()], _steps(twin, peft_groups(twin, 0.0)[0], token_ids())))
    name = "layers.0.attn.q_proj.magnitude"
    start = make_model().layers[0].attn.q_proj.weight.detach().norm(dim=1)  # ||W0|| per row, DoRA's start
    moved_ours, moved_theirs = (ours[name] - start).abs().max(), (theirs[name] - start).abs().max()
    assert moved_theirs > 8 * moved_ours  # 16x the lr: Adam's steps are about lr each


def test_first_step_moves_b_by_ratio_times_lr():
    """Adam's first step is lr * g / (|g| + eps), so about lr per entry; A's gradient is 0 (B = 0)."""
    model = inject_lora(make_model(), ["q_proj"], r=4, alpha=8)
    layer = model.layers[0].attn.q_proj
    a0 = layer.lora_A.detach().clone()
    _steps(model, loraplus_optimizer(model, LR, RATIO), token_ids(), n=1)
    assert torch.equal(layer.lora_A, a0)
    torch.testing.assert_close(layer.lora_B.abs().max().item(), LR * RATIO, rtol=1e-3, atol=0)


class EmbeddingAdapter(nn.Module):
    """A stand-in LoRA layer on an nn.Embedding (lora_edu has none yet): `base`, lora_A, lora_B."""

    def __init__(self, base: nn.Embedding, r: int = 2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.zeros(r, base.num_embeddings))
        self.lora_B = nn.Parameter(torch.zeros(base.embedding_dim, r))


def test_an_embedding_adapter_gets_lr_embedding_even_for_its_b():
    model = inject_lora(make_model(), ["q_proj"], r=4)
    model.embed = EmbeddingAdapter(model.embed)
    groups = loraplus_param_groups(model, LR, RATIO, lr_embedding=1e-5)
    emb = next(g for g in groups if g["name"] == "embedding")
    assert emb["lr"] == 1e-5 and [id(p) for p in emb["params"]] == [id(model.embed.lora_A), id(model.embed.lora_B)]


def test_groups_work_in_torch_adamw_too():
    model = mixed_model()
    twin = copy.deepcopy(model)
    ours = _steps(model, loraplus_optimizer(model, LR, RATIO, weight_decay=0.05), token_ids())
    theirs = _steps(twin, torch.optim.AdamW(loraplus_param_groups(twin, LR, RATIO, weight_decay=0.05),
                                            foreach=False), token_ids())
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def _frozen():
    return make_model().requires_grad_(False)


@pytest.mark.parametrize("make, kw, error, match", [
    (mixed_model, {"ratio": 0}, ValueError, "ratio > 0"),
    (mixed_model, {"ratio": -16}, ValueError, "ratio > 0"),
    (mixed_model, {"lr": 0}, ValueError, "lr > 0"),
    (mixed_model, {"lr": float("nan")}, ValueError, "lr > 0"),
    (mixed_model, {"lr_embedding": -1e-6}, ValueError, "lr_embedding > 0"),
    (mixed_model, {"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0"),
    (_frozen, {}, ValueError, "no trainable parameters; call inject_lora"),
    (make_model, {}, ValueError, "trains none"),  # every weight trainable, but no LoRA B anywhere
])
def test_bad_input_is_refused_and_the_model_left_alone(make, kw, error, match):
    model = make()
    before = snapshot(model)
    for fn in (loraplus_param_groups, loraplus_optimizer):
        with pytest.raises(error, match=match):
            fn(model, **{"lr": LR, **kw})
    assert_unchanged(model, before)


def test_a_non_module_is_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        loraplus_param_groups([nn.Parameter(torch.ones(2))], LR)


def test_adapter_file_round_trip_after_loraplus_training(tmp_path):
    model = inject_lora(make_model(), ["q_proj", "v_proj"], r=4, dora=True)
    _steps(model, loraplus_optimizer(model, LR, RATIO), token_ids(), n=3)
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = load_adapter(make_model(), tmp_path / "a.safetensors")
    trained, loaded = model.state_dict(), fresh.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(v, loaded[k]) for k, v in trained.items())
    assert torch.equal(model(token_ids()), fresh(token_ids()))
