"""Adapters on disk: only the adapter tensors, in safetensors, with the config as metadata.

A LoRA adapter for a 7B model is a few MB next to a 13 GB base, which is why adapters are
shared on their own. safetensors stores raw tensors plus a JSON header, so loading one
never runs code (unlike pickle, which torch.save uses).

File layout: one tensor per adapter parameter, named "<module name>.<parameter>", e.g.
"layers.0.q_proj.lora_A"; the metadata holds format, method, r, alpha, rslora, dropout
and targets (the JSON list of adapted module names).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .dora import DoRALinear
from .inject import adapter_modules, wrap_modules
from .lora import LoRALinear

FORMAT = "lora_edu.adapter.v1"
_CONFIG_KEYS = ("method", "r", "alpha", "rslora")  # must agree between file and model


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


def save_adapter(model: nn.Module, path) -> None:
    """Write the adapter tensors and config of `model` to `path` (safetensors)."""
    from safetensors.torch import save_file

    layers = adapter_modules(model)
    config = _shared_config(layers)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the adapters are merged into the base weights; call unmerge_lora(model) "
                         "before save_adapter so the file holds the adapter, not a mixture")
    tensors = {f"{name}.{p}": getattr(layer, p).detach().contiguous().cpu()
               for name, layer in layers.items() for p in layer.adapter_parameter_names}
    metadata = {"format": FORMAT, "targets": json.dumps(sorted(layers))}
    metadata.update({k: json.dumps(v) for k, v in config.items()})
    save_file(tensors, os.fspath(path), metadata=metadata)


def read_adapter(path) -> tuple[dict, dict]:
    """(config, tensors) from an adapter file, with a clear error for anything malformed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path!r}; save one with save_adapter(model, path)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path!r} is not a readable safetensors adapter file (truncated or corrupt?): {err}") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a lora_edu adapter (metadata format={metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    try:
        config = {k: json.loads(metadata[k]) for k in (*_CONFIG_KEYS, "dropout", "targets")}
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path!r} has an incomplete adapter config in its metadata: {err}") from err
    return config, tensors


def _layers_for_file(model: nn.Module, config: dict, path: str) -> dict:
    """The adapter layers the file must fit: the model's own, or (if it has none) stand-ins on
    the meta device built from the file's config, so that nothing real is allocated or changed."""
    layers = adapter_modules(model)
    if layers:
        return layers
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in config["targets"] if t not in linears]
    if missing:
        raise ValueError(f"adapter file {path!r} adapts {missing}, which are not nn.Linear layers of this model")
    cls = DoRALinear if config["method"] == "dora" else LoRALinear
    kwargs = {} if config["method"] == "dora" else {"dropout": config["dropout"]}
    return {name: cls(nn.Linear(linears[name].in_features, linears[name].out_features, device="meta"),
                      r=config["r"], alpha=config["alpha"], rslora=config["rslora"], **kwargs)
            for name in config["targets"]}


def _check_fits(config: dict, tensors: dict, layers: dict, path: str) -> None:
    """Raise unless the file's config, modules and tensor shapes are exactly the layers'."""
    if config["method"] not in ("lora", "dora"):
        raise ValueError(f"adapter file {path!r} has unknown method {config['method']!r}")
    model_config = _shared_config(layers)
    diff = {k: (config[k], model_config[k]) for k in _CONFIG_KEYS if config[k] != model_config[k]}
    if diff:
        raise ValueError(f"adapter file {path!r} was saved with another config; (file, model) = {diff}. "
                         "Inject with the file's settings, or load into a fresh base model.")
    if sorted(config["targets"]) != sorted(layers):
        raise ValueError(f"adapter file {path!r} adapts {config['targets']}, the model has adapters on "
                         f"{sorted(layers)}")
    expected = {f"{n}.{p}": tuple(getattr(layer, p).shape)
                for n, layer in layers.items() for p in layer.adapter_parameter_names}
    if set(expected) != set(tensors):
        raise ValueError(f"adapter file {path!r} holds tensors {sorted(tensors)}, the model expects {sorted(expected)}")
    wrong = {k: (tuple(t.shape), expected[k]) for k, t in tensors.items() if tuple(t.shape) != expected[k]}
    if wrong:
        raise ValueError(f"adapter file {path!r} was saved for other layer shapes; (file, model) = {wrong}")


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter file into `model`, bit-exactly; returns `model`.

    If the model has no adapter layers yet, they are injected first with the file's config
    (on exactly the modules the file names). Every check runs before anything is changed.
    """
    path = os.fspath(path)
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
