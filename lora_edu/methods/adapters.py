"""Adapters on disk: only the adapter tensors, in safetensors, with the config as metadata.

A LoRA adapter for a 7B model is a few MB next to a 13 GB base, which is why adapters are
shared on their own. safetensors stores raw tensors plus a JSON header, so loading one
never runs code (unlike pickle, which torch.save uses).

Two layouts, one loader:
- lora_edu's file: one tensor per adapter parameter, named "<module name>.<parameter>", e.g.
  "layers.0.q_proj.lora_A"; the metadata holds format, method, r, alpha, rslora, dropout,
  targets (the JSON list of adapted module names) and sha256, a hash of all of that and of
  every tensor's bytes. safetensors has no checksum of its own, so without the hash a flipped
  bit in a tensor loads silently. (Files of format v1, from before the hash, load unchecked.)
- HF PEFT's folder (adapter_config.json + adapter_model.safetensors): see peft_files.py.
load_adapter takes either (a file or a folder); save_adapter writes either (format=...).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .dora import DoRALinear
from .inject import adapter_modules, wrap_modules
from .lora import LoRALinear
from .peft_files import read_peft_folder, write_peft_folder
from .safe_files import (HASH_KEY, AdapterFileError, check_config, check_hash, content_hash, read_safetensors,
                         write_safetensors)

FORMAT = "lora_edu.adapter.v2"  # v1 (before the content hash) still loads, unchecked
OLD_FORMATS = ("lora_edu.adapter.v1",)
_CONFIG_KEYS = ("method", "r", "alpha", "rslora")  # must agree between file and model
_METADATA_KEYS = {"format", *_CONFIG_KEYS, "dropout", "targets", HASH_KEY}  # exactly these, in v2
FORMATS = ("lora_edu", "peft")


# ------------------------------------------------------------------ lora_edu's own file
def adapter_state(model: nn.Module) -> tuple[dict, dict]:
    """(config, tensors) of the model's adapters, keyed "<module>.<parameter>", ready to save."""
    layers = adapter_modules(model)
    config = _shared_config(layers)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the adapters are merged into the base weights; call unmerge_lora(model) "
                         "before save_adapter so the file holds the adapter, not a mixture")
    tensors = {f"{name}.{p}": getattr(layer, p).detach().contiguous().cpu()
               for name, layer in layers.items() for p in layer.adapter_parameter_names}
    return {**config, "targets": sorted(layers)}, tensors


def _shared_config(layers: dict) -> dict:
    """The config all adapter layers share; error if there are none or they disagree."""
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora(model, ...) first")
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
    if metadata["format"] == FORMAT and set(metadata) != _METADATA_KEYS:
        raise AdapterFileError(f"{path!r} has metadata keys {sorted(metadata)}, a {FORMAT} file has exactly "
                               f"{sorted(_METADATA_KEYS)} (the file was changed or corrupted since it was saved)")
    check_hash(metadata, tensors, path)
    try:
        config = {k: json.loads(metadata[k]) for k in (*_CONFIG_KEYS, "dropout", "targets")}
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
    cls = DoRALinear if config["method"] == "dora" else LoRALinear
    try:
        return {name: cls(nn.Linear(linears[name].in_features, linears[name].out_features, device="meta"),
                          r=config["r"], alpha=config["alpha"], rslora=config["rslora"], dropout=config["dropout"])
                for name in config["targets"]}
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. an r too large for any tensor
        raise AdapterFileError(f"adapter file {path!r} records r={config['r']!r}, which no layer of "
                               f"this model can take: {type(err).__name__}") from None


def _check_fits(config: dict, tensors: dict, layers: dict, path: str) -> None:
    """Raise unless the file's config, modules and tensor shapes are exactly the layers'."""
    model_config = _shared_config(layers)
    diff = {k: (config[k], model_config[k]) for k in _CONFIG_KEYS if config[k] != model_config[k]}
    if diff:
        raise AdapterFileError(f"adapter file {path!r} was saved with another config; (file, model) = {diff}. "
                               "Inject with the file's settings, or load into a fresh base model.")
    if sorted(config["targets"]) != sorted(layers):
        raise AdapterFileError(f"adapter file {path!r} adapts {config['targets']}, the model has adapters on "
                               f"{sorted(layers)}")
    expected = {f"{n}.{p}": tuple(getattr(layer, p).shape)
                for n, layer in layers.items() for p in layer.adapter_parameter_names}
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
        wrap_modules(model, config["targets"], r=config["r"], alpha=config["alpha"],
                     dropout=config["dropout"], rslora=config["rslora"], dora=config["method"] == "dora")
    layers = adapter_modules(model)
    with torch.no_grad():
        for key, value in tensors.items():
            name, _, pname = key.rpartition(".")
            param = getattr(layers[name], pname)
            param.copy_(value.to(param.device, param.dtype))
    return model
