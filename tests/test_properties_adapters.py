"""save_adapter then load_adapter is bit-exact, for every config and target set (hypothesis).

Random r, alpha, rsLoRA, DoRA, dropout, base dtype and target patterns on tests/_models.py's
TinyModel (suffixes such as "q_proj", full names such as "layers.1.mlp.fc2", and both at once).
The file must carry everything: a fresh base with no adapters gets the same layers, the same
hyper-parameters and the same tensors, bit for bit, and so computes the same outputs.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from _models import make_model, randomise_adapters_, token_ids
from lora_edu import DoRALinear, LoRALinear, adapter_modules, inject_lora, load_adapter, save_adapter

SUFFIXES = ["q_proj", "qq_proj", "v_proj", "o_proj", "fc1", "fc2", "head"]  # TinyModel's Linear names
FULL_NAMES = ["layers.0.attn.q_proj", "layers.0.attn.o_proj", "layers.1.mlp.fc2", "layers.1.attn.v_proj"]


@st.composite
def configs(draw):
    dora = draw(st.booleans())
    n_layers = draw(st.integers(1, 2))
    names = SUFFIXES + [t for t in FULL_NAMES if int(t.split(".")[1]) < n_layers]
    return dict(
        r=draw(st.integers(1, 8)), alpha=draw(st.floats(1e-3, 1e3)), rslora=draw(st.booleans()), dora=dora,
        dropout=0.0 if dora else draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9))),  # DoRA has none
        targets=draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True)),
        model_kw=dict(dim=draw(st.sampled_from([8, 16])), n_layers=n_layers, bias=draw(st.booleans())),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),  # of the base; adapters stay float32
        seed=draw(st.integers(0, 2**16)))


def base_model(c, seed=None):
    return make_model(c["seed"] if seed is None else seed, **c["model_kw"]).to(c["dtype"])


def trained(c, adapter_seed):
    model = inject_lora(base_model(c), c["targets"], r=c["r"], alpha=c["alpha"], dropout=c["dropout"],
                        rslora=c["rslora"], dora=c["dora"])
    randomise_adapters_(model, seed=adapter_seed)  # B != 0 and magnitude moved, as after training
    return model


def adapter_tensors(model):
    """Every LoRA / DoRA tensor, by name; the names are the method's, not read from the layers."""
    leaves = ("lora_A", "lora_B", "magnitude")
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in leaves}


def file_contents(path):
    """(metadata, tensors) read with safetensors itself, not lora_edu's reader."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def assert_same_adapters(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@given(configs())
def test_save_then_load_into_a_fresh_base_is_bit_exact(tmp_path_factory, c):
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    model = trained(c, adapter_seed=c["seed"] + 1)
    save_adapter(model, path)

    fresh = base_model(c)
    assert adapter_modules(fresh) == {}
    load_adapter(fresh, path)
    ours, theirs = adapter_modules(model), adapter_modules(fresh)
    assert sorted(theirs) == sorted(ours)  # the same modules, found from the file's names alone
    cls = DoRALinear if c["dora"] else LoRALinear
    for name, layer in theirs.items():
        assert type(layer) is cls, name
        assert (layer.r, layer.rslora, layer.dropout_p) == (c["r"], c["rslora"], c["dropout"])
        assert layer.alpha == c["alpha"] and layer.scaling == ours[name].scaling  # floats through JSON: exact
    assert_same_adapters(adapter_tensors(fresh), adapter_tensors(model))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(adapter_tensors(model))

    ids = token_ids()
    model.eval()
    fresh.eval()  # dropout off, so the outputs can be compared
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))

    # and saving the loaded model again writes the same file contents
    again = path.with_name("again.safetensors")
    save_adapter(fresh, again)
    (meta1, t1), (meta2, t2) = file_contents(path), file_contents(again)
    assert meta1 == meta2
    assert_same_adapters(t2, t1)


@given(configs())
def test_load_into_a_model_injected_with_the_same_config_is_bit_exact(tmp_path_factory, c):
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    model = trained(c, adapter_seed=c["seed"] + 1)
    save_adapter(model, path)

    other = inject_lora(base_model(c, seed=c["seed"] + 7), c["targets"], r=c["r"], alpha=c["alpha"],
                        dropout=c["dropout"], rslora=c["rslora"], dora=c["dora"])
    randomise_adapters_(other, seed=c["seed"] + 2)  # other values in every adapter tensor
    bases = {n: m.base.weight.detach().clone() for n, m in adapter_modules(other).items()}
    load_adapter(other, path)
    assert_same_adapters(adapter_tensors(other), adapter_tensors(model))
    for n, m in adapter_modules(other).items():  # the base weights are not in the file, and stay
        assert torch.equal(m.base.weight, bases[n]), n
