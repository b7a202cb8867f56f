"""Adapters on disk: only the adapter tensors, in safetensors, with the config as metadata.

A LoRA adapter for a 7B model is a few MB next to a 13 GB base, which is why adapters are
shared on their own. safetensors stores raw tensors plus a JSON header, so loading one
never runs code (unlike pickle, which torch.save uses).

Two layouts, one loader:
- lora_edu's file: one tensor per adapter tensor, named "<module name>.<tensor>", e.g.
  "layers.0.q_proj.lora_A"; the metadata holds format, the layers' adapter_config() (method,
  and for LoRA r, alpha, rslora, dropout; each method has its own keys, see base.py), targets
  (the JSON list of adapted module names) and sha256, a hash of all of that and of every
  tensor's bytes. safetensors has no checksum of its own, so without the hash a flipped
  bit in a tensor loads silently. (Files of format v1, from before the hash, load unchecked.)
- HF PEFT's folder (adapter_config.json + adapter_model.safetensors): see peft_files.py.
load_adapter takes either (a file or a folder); save_adapter writes either (format=...).
"""

from __future__ import annotations

import json
import os

from torch import nn

from .inject import adapter_modules, wrap_modules
from .peft_files import read_peft_folder, write_peft_folder
from .registry import adapter_class
from .safe_files import (HASH_KEY, AdapterFileError, check_config, check_hash, content_hash, read_safetensors,
                         write_safetensors)

FORMAT = "lora_edu.adapter.v2"  # v1 (before the content hash) still loads, unchecked
OLD_FORMATS = ("lora_edu.adapter.v1",)
_FILE_KEYS = ("format", "targets", HASH_KEY)  # a v2 file's metadata: these and the method's config_keys
_V1_CONFIG_KEYS = ("method", "r", "alpha", "rslora", "dropout")  # LoRA and DoRA only
FORMATS = ("lora_edu", "peft")
PEFT_METHODS = ("lora", "dora")  # what PEFT's LoRA folder can hold


# ------------------------------------------------------------------ lora_edu's own file
def adapter_state(model: nn.Module) -> tuple[dict, dict]:
    """(config, tensors) of the model's adapters, keyed "<module>.<parameter>", ready to save."""
    layers = adapter_modules(model)
    config = _shared_config(layers)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the adapters are merged into the base weights; call unmerge_lora(model) "
                         "before save_adapter so the file holds the adapter, not a mixture")
    tensors = {f"{name}.{p}": t.contiguous().cpu()
               for name, layer in layers.items() for p, t in layer.adapter_tensors().items()}
    return {**config, "targets": sorted(layers)}, tensors


def _shared_config(layers: dict) -> dict:
    """The config all adapter layers share; error if there are none or they disagree."""
    if not layers:
        raise ValueError("the model has no adapter layers; call inject_lora(model, ...) (or another "
                         "inject_* entry point) first")
    configs = {name: layer.adapter_config() for name, layer in layers.items()}
    first = next(iter(configs.values()))
    for name, config in configs.items():
        if config != first:
            raise ValueError(f"adapter layers disagree on their config ({name}: {config} vs {first}); "
                             "one file holds one adapter config")
    return first


def save_adapter(model: nn.Module, path, format: str = "lora_edu") -> None:
    """Write the adapters of `model` to `path`: one safetensors file (format="lora_edu"), or
    a folder that HF PEFT's PeftModel.from_pretrained reads (format="peft")."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = os.fspath(path)
    config, tensors = adapter_state(model)
    if format == "peft":
        if config["method"] not in PEFT_METHODS:
            raise ValueError(f"format='peft' writes PEFT's LoRA folder, which holds {PEFT_METHODS} adapters, "
                             f"not {config['method']!r}; save it with format='lora_edu'")
        return write_peft_folder(config, tensors, path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder; give a file name such as adapter.safetensors "
                         "(or format='peft' to write a PEFT adapter folder)")
    metadata = {"format": FORMAT, **{k: json.dumps(v) for k, v in config.items()}}
    metadata[HASH_KEY] = content_hash(metadata, tensors)
    write_safetensors(tensors, path, metadata)


def read_adapter(path) -> tuple[dict, dict]:
    """(config, tensors) from a lora_edu adapter file, with a clear error for anything malformed."""
    path = os.fspath(path)
    metadata, tensors = read_safetensors(path)
    if metadata.get("format") not in (FORMAT, *OLD_FORMATS):
        hint = (" It looks like PEFT's adapter_model.safetensors: pass its folder to load_adapter."
                if metadata.get("format") == "pt" else "")
        raise AdapterFileError(f"{path!r} is not a lora_edu adapter (metadata format="
                               f"{metadata.get('format')!r}, expected {FORMAT!r}).{hint}")
    check_hash(metadata, tensors, path)
    try:
        method = json.loads(metadata["method"])
        keys = adapter_class(method).config_keys if metadata["format"] == FORMAT else _V1_CONFIG_KEYS
    except (KeyError, json.JSONDecodeError, ValueError) as err:
        raise AdapterFileError(f"{path!r} records no known adapter method in its metadata: "
                               f"{type(err).__name__} {err}") from None
    expected = {*_FILE_KEYS, *keys}
    if metadata["format"] == FORMAT and set(metadata) != expected:
        raise AdapterFileError(f"{path!r} has metadata keys {sorted(metadata)}, a {FORMAT} {method} file has "
                               f"exactly {sorted(expected)} (the file was changed or corrupted since it was saved)")
    try:
        config = {k: json.loads(metadata[k]) for k in (*keys, "targets")}
    except (KeyError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path!r} has an incomplete adapter config in its metadata: "
                               f"{type(err).__name__} {err}") from None
    return check_config(config, path), tensors


# ------------------------------------------------------------------ loading into a model
def _layers_for_file(model: nn.Module, config: dict, path: str) -> dict:
    """The adapter layers the file must fit: the model's own, or (if it has none) stand-ins on
    the meta device built from the file's config, so that nothing real is allocated or changed."""
    layers = adapter_modules(model)
    if layers:
        return layers
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in config["targets"] if t not in linears]
    if missing:
        raise AdapterFileError(f"adapter file {path!r} adapts {missing}, which are not nn.Linear layers "
                               "of this model")
    cls = adapter_class(config["method"])
    try:
        return {name: cls.for_loading(nn.Linear(linears[name].in_features, linears[name].out_features,
                                                device="meta"), config, name=name)
                for name in config["targets"]}
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. an r too large for any tensor
        shown = {k: v for k, v in config.items() if k != "targets"}
        raise AdapterFileError(f"adapter file {path!r} records {shown}, which no layer of this model can "
                               f"take: {type(err).__name__}: {str(err)[:200]}") from None


def _check_fits(config: dict, tensors: dict, layers: dict, path: str) -> None:
    """Raise unless the file's config, modules and tensor shapes are exactly the layers'."""
    model_config = _shared_config(layers)
    first = next(iter(layers.values()))
    keys = [k for k in {*config, *model_config} - {"targets", *first.training_only_keys}]
    diff = {k: (config.get(k), model_config.get(k)) for k in sorted(keys) if config.get(k) != model_config.get(k)}
    if diff:
        raise AdapterFileError(f"adapter file {path!r} was saved with another config; (file, model) = {diff}. "
                               "Inject with the file's settings, or load into a fresh base model.")
    if sorted(config["targets"]) != sorted(layers):
        raise AdapterFileError(f"adapter file {path!r} adapts {config['targets']}, the model has adapters on "
                               f"{sorted(layers)}")
    expected = {f"{n}.{p}": tuple(t.shape) for n, layer in layers.items() for p, t in layer.adapter_tensors().items()}
    if set(expected) != set(tensors):
        raise AdapterFileError(f"adapter file {path!r} holds tensors {sorted(tensors)}, the model expects "
                               f"{sorted(expected)}")
    wrong = {k: (tuple(t.shape), expected[k]) for k, t in tensors.items() if tuple(t.shape) != expected[k]}
    if wrong:
        raise AdapterFileError(f"adapter file {path!r} was saved for other layer shapes; (file, model) = {wrong}")
    if not all(t.is_floating_point() for t in tensors.values()):
        raise AdapterFileError(f"adapter file {path!r} holds non-float tensors "
                               f"{ {k: str(t.dtype) for k, t in tensors.items() if not t.is_floating_point()} }")


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter into `model`, bit-exactly; returns `model`.

    `path` is a lora_edu adapter file or a PEFT adapter folder. If the model has no adapter
    layers yet, they are injected first with the file's config (on exactly the modules the
    file names). Every check runs before anything is changed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        config, tensors = read_peft_folder(path)
    else:
        config, tensors = read_adapter(path)
    if any(layer.merged for layer in adapter_modules(model).values()):
        raise ValueError("the model's adapters are merged; call unmerge_lora(model) before load_adapter")
    _check_fits(config, tensors, _layers_for_file(model, config, path), path)
    if not adapter_modules(model):
        cls = adapter_class(config["method"])
        wrap_modules(model, config["targets"], lambda name, base: cls.for_loading(base, config, name=name),
                     check=lambda name, base: cls.check_module(name, base, config))
    per_layer = {}
    for key, value in tensors.items():
        name, _, tname = key.rpartition(".")
        per_layer.setdefault(name, {})[tname] = value
    for name, layer in adapter_modules(model).items():
        layer.load_adapter_tensors_(per_layer[name])
    return model
