"""lora_edu.methods.peft_files: adapters written in PEFT's folder format load in PEFT, and PEFT's load here.

The claim under test is interoperability with the real library: a model adapted and trained
with lora_edu, saved with format="peft" and loaded with PeftModel.from_pretrained onto the
same base, computes what our model computes; an adapter that PEFT trained and saved, loaded
with load_adapter, computes what PEFT's model computes. Folders we cannot honour are refused,
with the reason, and leave the model and the folder as they were.
"""

import json

import pytest
import torch

peft = pytest.importorskip("peft")  # a few seconds to import; once per module
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402

from _adapter_files import rewrite  # noqa: E402
from _models import assert_unchanged, make_model, snapshot, token_ids  # noqa: E402
from lora_edu import (Adam, AdapterFileError, DoRALinear, LoRALinear, adapter_modules, inject_lora,  # noqa: E402
                      load_adapter, merge_lora, save_adapter)
from lora_edu.methods.peft_files import read_peft_folder  # noqa: E402

TARGETS = ["q_proj", "v_proj", "fc1", "head"]
R, ALPHA = 4, 8
METHODS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}
# Outputs of the two libraries: LoRA and rsLoRA run the same float32 ops in the same order
# (base matmul, then x @ A.T @ B.T scaled, added), so they agree bit for bit. DoRA does not:
# we multiply x by the merged W' = m * V / ||V||, PEFT rescales base(x) and the bypass
# separately, so each logit carries a few dozen float32 roundings (2^-24 relative) of terms
# no larger than max|logit| through the two blocks; 2e-6 * max|logit| is about 30 of them.
DORA_RTOL = 2e-6


def trained(method="lora", seed=0, targets=TARGETS, steps=3, **model_kw):
    """A lora_edu model whose adapters took a few real Adam steps (B != 0, magnitude moved)."""
    model = inject_lora(make_model(seed, **model_kw), targets, r=R, alpha=ALPHA, **METHODS[method])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Adam(params, lr=5e-2)
    ids = token_ids(seed=seed + 2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(m.lora_B.abs().max() > 0 for m in adapter_modules(model).values())
    return model


def assert_same_outputs(ours, theirs, dora, base):
    """Equal outputs (see DORA_RTOL), and different from the bare `base`: the adapters matter."""
    ids = token_ids()
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a, b = ours(ids), theirs(ids)
        assert not torch.allclose(a, base(ids), atol=1e-3)
    if dora:
        torch.testing.assert_close(a, b, rtol=0, atol=DORA_RTOL * a.abs().max().item())
    else:
        assert torch.equal(a, b)


def peft_layers(peft_model):
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


# ------------------------------------------------------------------ lora_edu -> PEFT
@pytest.mark.parametrize("method", METHODS)
def test_exported_adapter_loads_in_peft_with_the_same_outputs(tmp_path, method):
    ours = trained(method)
    save_adapter(ours, tmp_path / "adapter", format="peft")
    theirs = PeftModel.from_pretrained(make_model(0), tmp_path / "adapter")
    assert sorted(peft_layers(theirs)) == sorted(adapter_modules(ours))  # exactly these modules
    cfg = theirs.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.use_dora) == (R, ALPHA, method == "rslora", method == "dora")
    assert_same_outputs(ours, theirs, method == "dora", make_model(0))


class Nested(torch.nn.Module):
    """Has "attn.q_proj" and also "extra.attn.q_proj", whose name ends with ".attn.q_proj"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4)})
        self.extra = torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4)})})

    def forward(self, x):
        return self.extra["attn"]["q_proj"](self.attn["q_proj"](x))


def test_exported_target_modules_pick_exactly_the_adapted_modules(tmp_path):
    # PEFT matches a *list* of target_modules by dotted suffix, so ["attn.q_proj"] would also
    # adapt "extra.attn.q_proj". The export writes a regex that PEFT fullmatches instead.
    from lora_edu.methods.inject import wrap_modules

    ours = wrap_modules(Nested(), ["attn.q_proj"], lambda name, base: LoRALinear(base, r=2, alpha=4))
    torch.nn.init.normal_(ours.attn["q_proj"].lora_B)
    save_adapter(ours, tmp_path / "adapter", format="peft")
    theirs = PeftModel.from_pretrained(Nested(), tmp_path / "adapter")
    assert sorted(peft_layers(theirs)) == ["attn.q_proj"]
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_exported_folder_has_peft_names_and_only_adapter_tensors(tmp_path):
    ours = trained("dora")
    save_adapter(ours, tmp_path / "adapter", format="peft")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                      "adapter_model.safetensors"]
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    want = {f"base_model.model.{n}.{leaf}" for n in adapter_modules(ours)
            for leaf in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    assert keys == want


# ------------------------------------------------------------------ PEFT -> lora_edu
def peft_saved(tmp_path, method, seed=7, targets=TARGETS, **model_kw):
    """A PEFT model with random non-zero B (and a moved magnitude), saved by PEFT itself."""
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0,
                        use_rslora=method == "rslora", use_dora=method == "dora")
    theirs = get_peft_model(make_model(0, **model_kw), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp_path / f"peft_{method}"
    theirs.save_pretrained(folder)
    return folder, theirs


@pytest.mark.parametrize("method", METHODS)
def test_peft_saved_adapter_loads_here_with_the_same_outputs(tmp_path, method):
    folder, theirs = peft_saved(tmp_path, method)
    ours = load_adapter(make_model(0), folder)
    cls = DoRALinear if method == "dora" else LoRALinear
    assert sorted(adapter_modules(ours)) == sorted(peft_layers(theirs))
    assert all(type(m) is cls and m.rslora == (method == "rslora") for m in adapter_modules(ours).values())
    assert_same_outputs(ours, theirs, method == "dora", make_model(0))
    # and into a model already injected with the same config: the same values arrive
    injected = inject_lora(make_model(0), TARGETS, r=R, alpha=ALPHA, **METHODS[method])
    load_adapter(injected, folder)
    for k, v in ours.state_dict().items():
        assert torch.equal(injected.state_dict()[k], v), k


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_round_trip_through_both_formats_is_bit_exact(tmp_path, method):
    ours = trained(method)
    save_adapter(ours, tmp_path / "adapter", format="peft")
    back = load_adapter(make_model(0), tmp_path / "adapter")
    save_adapter(back, tmp_path / "adapter.safetensors")
    again = load_adapter(make_model(0), tmp_path / "adapter.safetensors")
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_transformers_llama_both_ways(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)

    def llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()

    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = inject_lora(llama(), ["q_proj", "v_proj", "down_proj"], r=R, alpha=ALPHA, dora=True)
    for m in adapter_modules(ours).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    save_adapter(ours, tmp_path / "ours", format="peft")
    theirs = PeftModel.from_pretrained(llama(), tmp_path / "ours")
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=DORA_RTOL * a.abs().max().item())
    assert "model.layers.1.mlp.down_proj" in adapter_modules(ours)  # transformers' own names

    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(llama(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, b, rtol=0, atol=DORA_RTOL * a.abs().max().item())


# ------------------------------------------------------------------ folders we must refuse
def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def assert_refused(folder, match, **model_kw):
    """load_adapter raises AdapterFileError naming the problem, into a bare and an injected model;
    both models and the folder stay as they were."""
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    for model in (make_model(0, **model_kw), inject_lora(make_model(0, **model_kw), TARGETS, r=R, alpha=ALPHA)):
        before = snapshot(model)
        with pytest.raises(AdapterFileError, match=match):
            load_adapter(model, folder)
        assert_unchanged(model, before)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


@pytest.fixture
def folder(tmp_path):
    return peft_saved(tmp_path, "lora")[0]


def test_another_peft_method_is_refused_by_name(tmp_path):
    model = get_peft_model(make_model(0), IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    model.save_pretrained(tmp_path / "ia3")
    assert_refused(tmp_path / "ia3", r"PEFT adapter of type 'IA3'.*lora_edu reads LoRA, rsLoRA and DoRA")


@pytest.mark.parametrize("change, match", [
    (dict(rank_pattern={"fc1": 8}), r"rank_pattern=\{'fc1': 8\}, which lora_edu does not implement"),
    (dict(alpha_pattern={"fc1": 32}), r"alpha_pattern"),
    (dict(bias="lora_only"), r"bias='lora_only'"),
    (dict(modules_to_save=["head"]), r"modules_to_save=\['head'\]"),
    (dict(fan_in_fan_out=True), r"fan_in_fan_out=True"),
    (dict(lora_bias=True), r"lora_bias=True"),
    (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa', which rewrites the base weights"),
    (dict(init_lora_weights="olora"), r"init_lora_weights='olora'"),
    (dict(some_future_option={"on": 1}), r"PEFT option some_future_option=\{'on': 1\}, unknown to lora_edu"),
    (dict(r="4"), r"r must be a positive int"),
    (dict(r=True), r"r must be a positive int"),
    (dict(lora_alpha=None), r"alpha must be a positive, finite number"),
    (dict(use_dora="yes"), r"use_dora='yes'; it must be true or false"),
    (dict(use_rslora=1), r"use_rslora=1; it must be true or false"),
    (dict(lora_dropout=1.5), r"dropout must be a probability"),
    (dict(peft_type=None), r"PEFT adapter of type None"),
    (dict(r=2), r"other layer shapes|another config.*'r': \(2, 4\)"),  # the tensors say r = 4
])
def test_settings_we_cannot_honour_are_refused(folder, change, match):
    edit_config(folder, **change)
    assert_refused(folder, match)


def test_config_without_r_or_alpha(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(folder, r"has no 'lora_alpha'")


@pytest.mark.parametrize("text, match", [("[1, 2]", "holds a JSON list"), ("{\"r\": 4", "not valid JSON"),
                                         (b"\xff\xfe{}", "not valid JSON")])
def test_config_that_is_not_a_json_object(folder, text, match):
    path = folder / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_refused(folder, match)


def test_missing_files(folder):
    (folder / "adapter_model.safetensors").unlink()
    assert_refused(folder, r"has no adapter_model.safetensors$")
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")  # what old PEFT wrote: a pickle
    assert_refused(folder, r"adapter_model.bin, a pickle, which lora_edu never opens")
    (folder / "adapter_config.json").unlink()
    assert_refused(folder, r"has no adapter_config.json, so it is not a PEFT adapter folder")


def test_adapter_for_other_shapes_or_other_modules(tmp_path):
    folder, _ = peft_saved(tmp_path, "lora", dim=8)
    assert_refused(folder, "other layer shapes")
    folder, _ = peft_saved(tmp_path, "lora", n_layers=2)
    assert_refused(folder, r"adapts \[.*'layers\.1\..*(which are not nn\.Linear layers|the model has adapters on)",
                   n_layers=1)


@pytest.mark.parametrize("edit, match", [
    ("drop lora_B", r"holds tensors .* the model expects"),
    ("extra tensor", r"holds the tensor 'base_model.model.layers.0.attn.q_proj.weight', which is not a LoRA"),
    ("embedding LoRA", r"lora_embedding_A.*not a LoRA or DoRA adapter tensor"),
    ("int tensor", r"non-float tensors"),
])
def test_tensors_that_do_not_make_an_adapter(folder, edit, match):
    key_b = "base_model.model.layers.1.mlp.fc1.lora_B.weight"

    def change(tensors):  # PEFT's own file has no hash, so rewrite computes none
        if edit == "drop lora_B":
            del tensors[key_b]
        elif edit == "extra tensor":
            tensors["base_model.model.layers.0.attn.q_proj.weight"] = torch.zeros(16, 16)
        elif edit == "embedding LoRA":
            tensors["base_model.model.embed.lora_embedding_A"] = torch.zeros(4, 11)
        else:
            tensors[key_b] = tensors[key_b].to(torch.int32)
        return tensors
    rewrite(folder / "adapter_model.safetensors", tensors=change)
    assert_refused(folder, match)


def test_dora_dropout_is_kept(tmp_path):
    folder, theirs = peft_saved(tmp_path, "dora")
    edit_config(folder, lora_dropout=0.1)
    ours = load_adapter(make_model(0), folder)
    assert {layer.dropout_p for layer in adapter_modules(ours).values()} == {0.1}
    assert_same_outputs(ours, theirs, True, make_model(0))  # eval mode: dropout is off in both


def test_exported_folder_detects_corruption_peft_folder_does_not_need_a_hash(tmp_path, folder):
    # our export records a content hash beside PEFT's metadata; PEFT's own folders have none
    ours = trained()
    save_adapter(ours, tmp_path / "ours", format="peft")
    raw = bytearray((tmp_path / "ours" / "adapter_model.safetensors").read_bytes())
    raw[-1] ^= 1  # one bit of the last tensor's last byte
    (tmp_path / "ours" / "adapter_model.safetensors").write_bytes(bytes(raw))
    assert_refused(tmp_path / "ours", "does not match the content hash")
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert "lora_edu.sha256" not in f.metadata()
        n_tensors = len(f.keys())
    config, tensors = read_peft_folder(str(folder))  # PEFT-saved: no hash, still loads
    assert config["method"] == "lora" and len(tensors) == n_tensors


# ------------------------------------------------------------------ saving errors write nothing
def test_export_refuses_a_file_path_a_merged_model_and_a_model_without_adapters(tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(ValueError, match="is a file; format='peft' writes a folder"):
        save_adapter(trained(), tmp_path / "a_file", format="peft")
    assert (tmp_path / "a_file").read_text() == "keep me"
    with pytest.raises(ValueError, match="merged.*unmerge_lora"):
        save_adapter(merge_lora(trained()), tmp_path / "merged", format="peft")
    with pytest.raises(ValueError, match="no adapter layers"):
        save_adapter(make_model(0), tmp_path / "none", format="peft")
    with pytest.raises(ValueError, match=r"format must be one of \('lora_edu', 'peft'\), got 'PEFT'"):
        save_adapter(trained(), tmp_path / "x", format="PEFT")
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        save_adapter(trained(), tmp_path, format="lora_edu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_export_replaces_an_older_export(tmp_path):
    save_adapter(trained(seed=0), tmp_path / "adapter", format="peft")
    newer = trained(seed=1)
    save_adapter(newer, tmp_path / "adapter", format="peft")
    loaded = load_adapter(make_model(1), tmp_path / "adapter")
    for k, v in newer.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_exporting_leaves_the_model_alone(tmp_path):
    ours = trained("dora")
    before = snapshot(ours)
    save_adapter(ours, tmp_path / "adapter", format="peft")
    assert_unchanged(ours, before)


def test_qlora_adapter_travels_through_the_peft_format(tmp_path):
    # a QLoRA model's adapters are float32 LoRA tensors like any other: the same folder carries them
    from lora_edu import prepare_qlora

    source = prepare_qlora(make_model(0), TARGETS, r=R, alpha=ALPHA, skip=())
    for m in adapter_modules(source).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    save_adapter(source, tmp_path / "adapter", format="peft")
    target = prepare_qlora(make_model(0), TARGETS, r=R, alpha=ALPHA, skip=())
    load_adapter(target, tmp_path / "adapter")
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
