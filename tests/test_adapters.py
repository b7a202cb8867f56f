"""lora_edu.methods.adapters: save/load adapters as safetensors, bit-exactly, with clear errors.

Every failed load must leave the model as it was (values, module types, flags).
"""

import json
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _adapter_files import rewrite
from _models import (assert_unchanged, make_model, names_ending_with, randomise_adapters_, snapshot,
                     token_ids)
from lora_edu import (AdapterFileError, DoRALinear, LoRALinear, adapter_modules, inject_lora, load_adapter, merge_lora,
                      read_adapter, save_adapter)

TARGETS = ["q_proj", "fc1"]
R, ALPHA = 4, 8


def trained(dora=False, seed=0, targets=TARGETS, model_kw=None, **kw):
    model = inject_lora(make_model(seed, **(model_kw or {})), targets, r=kw.pop("r", R),
                        alpha=kw.pop("alpha", ALPHA), dora=dora, **kw)
    randomise_adapters_(model, seed=seed + 11)
    return model


def adapter_tensors(model):
    leaves = ("lora_A", "lora_B", "magnitude")
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in leaves}


def expected_keys(model_without_adapters, dora):
    names = [n for t in TARGETS for n in names_ending_with(model_without_adapters, t)]
    params = ("lora_A", "lora_B", "magnitude") if dora else ("lora_A", "lora_B")
    return {f"{n}.{p}" for n in names for p in params}


@pytest.fixture
def saved(tmp_path):
    """(path, model) of a saved LoRA adapter."""
    model = trained()
    path = tmp_path / "lora.safetensors"
    save_adapter(model, path)
    return path, model


@pytest.fixture
def saved_dora(tmp_path):
    model = trained(dora=True)
    path = tmp_path / "dora.safetensors"
    save_adapter(model, path)
    return path, model


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dora", [False, True])
def test_round_trip_into_a_fresh_base_is_bit_exact(tmp_path, dora):
    model = trained(dora=dora)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)

    fresh = make_model(0)  # the same base, no adapters yet
    assert adapter_modules(fresh) == {}
    assert load_adapter(fresh, path) is fresh
    cls = DoRALinear if dora else LoRALinear
    assert sorted(adapter_modules(fresh)) == sorted(adapter_modules(model))
    assert all(type(m) is cls for m in adapter_modules(fresh).values())

    want, got = adapter_tensors(model), adapter_tensors(fresh)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(want)


@pytest.mark.parametrize("dora", [False, True])
def test_round_trip_into_a_model_injected_with_the_same_config(tmp_path, dora):
    model = trained(dora=dora, seed=0)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)

    other = trained(dora=dora, seed=5)  # other base weights, other adapter values
    base_before = {n: m.base.weight.clone() for n, m in adapter_modules(other).items()}
    assert not all(torch.equal(adapter_tensors(other)[k], v) for k, v in adapter_tensors(model).items())
    load_adapter(other, path)
    for k, v in adapter_tensors(model).items():
        assert torch.equal(adapter_tensors(other)[k], v), k
    for n, m in adapter_modules(other).items():  # the base weights are not in the file
        assert torch.equal(m.base.weight, base_before[n])


def test_fresh_load_takes_rslora_and_dropout_from_the_file(tmp_path):
    model = trained(rslora=True, dropout=0.2)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh = load_adapter(make_model(0), path)
    for layer in adapter_modules(fresh).values():
        assert layer.rslora and layer.r == R and layer.alpha == ALPHA and layer.dropout_p == 0.2
    fresh.eval()
    model.eval()  # dropout off, so the outputs can be compared
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


# ------------------------------------------------------------------ the file itself
@pytest.mark.parametrize("dora", [False, True])
def test_file_is_safetensors_with_config_metadata_and_only_adapter_tensors(tmp_path, dora):
    model = trained(dora=dora)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert json.loads(meta["method"]) == ("dora" if dora else "lora")
    assert json.loads(meta["r"]) == R
    assert json.loads(meta["alpha"]) == ALPHA
    assert json.loads(meta["rslora"]) is False
    assert sorted(json.loads(meta["targets"])) == sorted(
        n for t in TARGETS for n in names_ending_with(make_model(), t))

    assert keys == expected_keys(make_model(), dora)
    assert not any(k.endswith(("weight", "bias")) or ".base." in k for k in keys)  # no base weights
    for k, shape in shapes.items():
        assert shape == tuple(model.get_parameter(k).shape)

    config, tensors = read_adapter(path)
    assert config["method"] == json.loads(meta["method"]) and config["r"] == R
    assert set(tensors) == keys


def test_file_is_not_a_pickle_and_loading_never_unpickles(saved, monkeypatch):
    path, model = saved
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80")           # pickle protocol 2+ opcode PROTO
    assert not raw.startswith(b"PK\x03\x04")     # zip: torch.save's default container
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header size, then JSON
    assert raw[8:9] == b"{" and json.loads(raw[8:8 + header_len])["__metadata__"]

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be needed to read an adapter")
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    fresh = load_adapter(make_model(0), path)
    for k, v in adapter_tensors(model).items():
        assert torch.equal(adapter_tensors(fresh)[k], v)


# ------------------------------------------------------------------ errors leave the model alone
def fresh_and_injected(**kw):
    """A model without adapters and one injected with the default config, plus snapshots."""
    models = [make_model(0, **kw), trained(model_kw=kw)]
    return [(m, snapshot(m)) for m in models]


def test_file_for_other_shapes(saved):
    path, _ = saved
    for model, before in fresh_and_injected(dim=8):
        with pytest.raises(ValueError, match="other layer shapes"):
            load_adapter(model, path)
        assert_unchanged(model, before)


def test_file_for_layers_this_model_does_not_have(saved):
    path, _ = saved
    model = make_model(0, n_layers=1)  # no layers.1.*
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.q_proj.*not nn\.Linear layers of this model"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_file_for_other_targets_than_the_model_adapts(saved):
    path, _ = saved
    model = trained(targets=["v_proj"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapts"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_dora_file_into_lora_model_and_lora_file_into_dora_model(saved, saved_dora):
    for path, model in [(saved_dora[0], trained(dora=False)), (saved[0], trained(dora=True))]:
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"another config.*'method'"):
            load_adapter(model, path)
        assert_unchanged(model, before)


@pytest.mark.parametrize("kw, key", [(dict(r=2), "r"), (dict(alpha=4), "alpha"), (dict(rslora=True), "rslora")])
def test_file_for_another_config(saved, kw, key):
    path, _ = saved
    model = trained(**kw)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"another config.*'{key}'"):
        load_adapter(model, path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("cut", ["half", "last byte"])
def test_truncated_file(saved, tmp_path, cut):
    path, _ = saved
    raw = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(raw[: len(raw) // 2] if cut == "half" else raw[:-1])
    with pytest.raises(ValueError, match="not a readable safetensors adapter file"):
        read_adapter(bad)
    for model, before in fresh_and_injected():
        with pytest.raises(ValueError, match="truncated.safetensors"):
            load_adapter(model, bad)
        assert_unchanged(model, before)


def _without(key):
    return lambda tensors: {k: v for k, v in tensors.items() if k != key}


@pytest.mark.parametrize("edit, match", [
    (_without("layers.1.mlp.fc1.lora_B"), r"holds tensors .*, the model expects .*'layers.1.mlp.fc1.lora_B'"),
    (lambda t: {**t, "layers.0.attn.q_proj.base.weight": torch.zeros(16, 16)}, r"holds tensors .*q_proj.base.weight"),
    (lambda t: {**t, "layers.0.attn.q_proj.lora_A": t["layers.0.attn.q_proj.lora_A"].to(torch.int64)},
     r"non-float tensors \{'layers.0.attn.q_proj.lora_A': 'torch.int64'\}"),
])
def test_file_whose_tensors_do_not_make_the_adapter(saved, edit, match):
    # the hash is recomputed (see _adapter_files), so the check reached is the tensor check
    path, _ = saved
    rewrite(path, tensors=edit)
    for model, before in fresh_and_injected():
        with pytest.raises(AdapterFileError, match=match):
            load_adapter(model, path)
        assert_unchanged(model, before)


def test_save_refuses_layers_that_disagree_on_their_config(tmp_path):
    model = trained()
    layer = adapter_modules(model)["layers.0.attn.q_proj"]
    layer.alpha, layer.scaling = 99.0, 99.0 / layer.r  # one layer with another alpha
    with pytest.raises(ValueError, match=r"adapter layers disagree on their config .*'alpha': 99.0"):
        save_adapter(model, tmp_path / "mixed.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_file_that_is_not_an_adapter(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in make_model(0).state_dict().items()}, str(path))
    for model, before in fresh_and_injected():
        with pytest.raises(ValueError, match="is not a lora_edu adapter"):
            load_adapter(model, path)
        assert_unchanged(model, before)


def test_path_that_does_not_exist(tmp_path):
    path = tmp_path / "missing.safetensors"
    for model, before in fresh_and_injected():
        with pytest.raises(FileNotFoundError, match="no adapter file at .*missing.safetensors"):
            load_adapter(model, path)
        assert_unchanged(model, before)


def test_load_into_merged_model(saved):
    path, _ = saved
    model = merge_lora(trained(seed=3))
    before = snapshot(model)
    with pytest.raises(ValueError, match="merged.*unmerge_lora"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_save_merged_model_refuses_and_writes_nothing(tmp_path):
    model = merge_lora(trained())
    before = snapshot(model)
    path = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match="merged.*unmerge_lora"):
        save_adapter(model, path)
    assert not path.exists()
    assert_unchanged(model, before)


def test_save_model_without_adapters_refuses(tmp_path):
    path = tmp_path / "none.safetensors"
    with pytest.raises(ValueError, match="no adapter layers"):
        save_adapter(make_model(), path)
    assert not path.exists()


# ------------------------------------------------------------------ a fresh load adapts exactly what the file names
class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(4, 4)


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Attn()


class _Larger(torch.nn.Module):
    """Has the file's "attn.q_proj" and also "extra.attn.q_proj", which the file does not name."""

    def __init__(self):
        super().__init__()
        self.attn = _Attn()
        self.extra = _Small()


def test_fresh_load_adapts_exactly_the_modules_the_file_names(tmp_path):
    # load_adapter promises "on exactly the modules the file names"; it re-injects with the
    # names as suffix targets, so "attn.q_proj" also catches "extra.attn.q_proj".
    torch.manual_seed(0)
    source = inject_lora(_Small(), ["q_proj"], r=2)
    path = tmp_path / "small.safetensors"
    save_adapter(source, path)
    assert read_adapter(path)[0]["targets"] == ["attn.q_proj"]

    model = load_adapter(_Larger(), path)
    assert sorted(adapter_modules(model)) == ["attn.q_proj"]  # not "extra.attn.q_proj" as well
    assert type(model.extra.attn.q_proj) is torch.nn.Linear
    load_adapter(model, path)  # and the same file loads again into the model it produced


@pytest.mark.parametrize("shape", [(16, 1), (15,), ()], ids=["column", "short", "scalar"])
def test_dora_file_with_a_magnitude_of_the_wrong_shape(saved_dora, shape):
    """One length per output row, [out]: any other shape is refused before anything changes."""
    path, _ = saved_dora
    key = "layers.0.attn.q_proj.magnitude"
    rewrite(path, tensors=lambda t: {**t, key: torch.ones(shape)})
    for model in (make_model(0), trained(dora=True)):
        before = snapshot(model)
        shown = re.escape(str((tuple(shape), (16,))))
        with pytest.raises(AdapterFileError, match=rf"saved for other layer shapes.*'{key}': {shown}"):
            load_adapter(model, path)
        assert_unchanged(model, before)


def test_dora_with_dropout_round_trips(tmp_path):
    model = trained(dora=True, dropout=0.1)
    save_adapter(model, tmp_path / "dora.safetensors")
    fresh = load_adapter(make_model(0), tmp_path / "dora.safetensors")
    assert {(type(m), m.dropout_p) for m in adapter_modules(fresh).values()} == {(DoRALinear, 0.1)}
    fresh.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(token_ids()), model(token_ids()))
