"""HF PEFT's adapter folder, written and read: how lora_edu adapters travel to and from the ecosystem.

PEFT (github.com/huggingface/peft) shares a LoRA adapter as a folder of two files:

    adapter_config.json        peft_type "LORA", r, lora_alpha, use_rslora, use_dora, lora_dropout,
                               target_modules, and switches for features lora_edu does not have
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight          [r, in]
                               base_model.model.<module>.lora_B.weight          [out, r]
                               base_model.model.<module>.lora_magnitude_vector  [out]   (DoRA only)

The tensors are the same numbers as lora_edu's (same orientation, same scale s), so moving
between the formats renames keys and translates the config. Reading refuses, with the reason,
any setting that would make our outputs differ from PEFT's: another method (IA3, prefix, ...),
per-module ranks, trained biases, modules_to_save, and initialisations that rewrite the base
weights (PiSSA, OLoRA, LoftQ, ...), which the adapter alone does not carry.
"""

from __future__ import annotations

import json
import os
import re

from .safe_files import (HASH_KEY, AdapterFileError, check_config, check_hash, content_hash, read_safetensors,
                         write_safetensors)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's LoraModel wraps the user's model as .base_model.model
KEY_SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "magnitude": ".lora_magnitude_vector"}
HASH_META = "lora_edu." + HASH_KEY  # our content hash, kept beside PEFT's own {"format": "pt"}

# PEFT settings that change which numbers the adapter computes, and the value under which
# they are off. Anything else PEFT writes either names the model (task_type, revision, ...),
# picks modules (the tensors' keys already say which), or is unknown to us: an unknown one
# must be off (None, False, empty) or the folder is refused.
_MUST_BE_OFF = {"bias": "none", "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False,
                "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
                "trainable_token_indices": None, "layer_replication": None, "megatron_config": None}
_HARMLESS = {"peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout", "init_lora_weights",
             "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "task_type",
             "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
             "megatron_core", "qalora_group_size", "ensure_weight_tying", "loftq_config", "eva_config"}
_INITS_THAT_KEEP_THE_BASE = (True, False, "gaussian", "eva")


def peft_config(config: dict) -> dict:
    """adapter_config.json for a lora_edu config; target_modules is a regex that PEFT matches
    with re.fullmatch, so it picks exactly the adapted modules (a list would match by suffix)."""
    alpha = config["alpha"]
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "r": config["r"], "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "use_rslora": config["rslora"], "use_dora": config["method"] == "dora",
            "lora_dropout": config["dropout"], "init_lora_weights": True, "inference_mode": True,
            "target_modules": "|".join(re.escape(name) for name in config["targets"]),
            **_MUST_BE_OFF}


def write_peft_folder(config: dict, tensors: dict, folder: str) -> None:
    """Write `folder`/adapter_config.json and adapter_model.safetensors (created or replaced)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is a file; format='peft' writes a folder (adapter_config.json + "
                         "adapter_model.safetensors): give a folder name")
    peft_tensors = {}
    for key, tensor in tensors.items():
        name, _, pname = key.rpartition(".")
        peft_tensors[PREFIX + name + KEY_SUFFIX[pname]] = tensor
    metadata = {"format": "pt"}
    metadata[HASH_META] = content_hash(metadata, peft_tensors, skip=HASH_META)
    os.makedirs(folder, exist_ok=True)
    write_safetensors(peft_tensors, os.path.join(folder, WEIGHTS_FILE), metadata)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(peft_config(config), f, indent=2, sort_keys=True)


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path!r} is not valid JSON (truncated or corrupt?): {err}") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path!r} holds a JSON {type(raw).__name__}, not the object of a PEFT config")
    return raw


def _is_off(key: str, value) -> bool:
    return value in (None, "none") if key == "bias" else value in (None, False, {}, [])


def _from_peft_config(raw: dict, path: str) -> dict:
    """lora_edu's config (without targets) from adapter_config.json, or a refusal saying why."""
    if raw.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path!r} is a PEFT adapter of type {raw.get('peft_type')!r}; lora_edu reads "
                               "LoRA, rsLoRA and DoRA adapters (peft_type 'LORA')")
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise AdapterFileError(f"{path!r} has no {key!r}; a PEFT LoRA config records r and lora_alpha")
    for key in _MUST_BE_OFF:
        if not _is_off(key, raw.get(key)):
            raise AdapterFileError(f"{path!r} sets {key}={raw[key]!r}, which lora_edu does not implement, so "
                                   "its outputs would differ from PEFT's; load this adapter with PEFT")
    for key, value in raw.items():
        if key not in _HARMLESS and key not in _MUST_BE_OFF and not _is_off(key, value):
            raise AdapterFileError(f"{path!r} sets the PEFT option {key}={value!r}, unknown to lora_edu; "
                                   "load this adapter with PEFT")
    init = raw.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _INITS_THAT_KEEP_THE_BASE):
        raise AdapterFileError(f"{path!r} was initialised with init_lora_weights={init!r}, which rewrites the "
                               "base weights; the folder alone cannot restore them. Convert it to a plain "
                               "LoRA adapter with PEFT first (path_initial_model_for_weight_conversion)")
    for key in ("use_rslora", "use_dora"):
        if not isinstance(raw.get(key, False), bool):
            raise AdapterFileError(f"{path!r} records {key}={raw[key]!r}; it must be true or false")
    method = "dora" if raw.get("use_dora", False) else "lora"
    dropout = raw.get("lora_dropout", 0.0)
    return {"method": method, "r": raw["r"], "alpha": raw["lora_alpha"],
            "rslora": raw.get("use_rslora", False), "dropout": dropout}


def _from_peft_keys(tensors: dict, path: str) -> tuple[list, dict]:
    """(module names, tensors keyed "<module>.<parameter>") from PEFT's tensor keys."""
    ours = {}
    for key, tensor in tensors.items():
        match = [p for p, suffix in KEY_SUFFIX.items() if key.startswith(PREFIX) and key.endswith(suffix)]
        if key.startswith(PREFIX) and key.endswith(".lora_magnitude_vector.weight"):  # older PEFT releases
            match, key = ["magnitude"], key[: -len(".weight")]
        if not match:
            raise AdapterFileError(f"{path!r} holds the tensor {key!r}, which is not a LoRA or DoRA adapter "
                                   f"tensor (lora_edu reads {PREFIX}<module>{{{', '.join(KEY_SUFFIX.values())}}})")
        name = key[len(PREFIX): -len(KEY_SUFFIX[match[0]])]
        ours[f"{name}.{match[0]}"] = tensor
    return sorted({k.rpartition(".")[0] for k in ours}), ours


def read_peft_folder(folder: str) -> tuple[dict, dict]:
    """(config, tensors) in lora_edu's form from a PEFT LoRA/DoRA adapter folder."""
    config_path, weights_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(config_path):
        raise AdapterFileError(f"the folder {folder!r} has no {CONFIG_FILE}, so it is not a PEFT adapter "
                               "folder (a lora_edu adapter is a single .safetensors file: pass the file)")
    if not os.path.isfile(weights_path):
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(folder, n))]
        raise AdapterFileError(f"the folder {folder!r} has no {WEIGHTS_FILE}" + (
            f"; it has {pickled[0]}, a pickle, which lora_edu never opens (unpickling can run code). "
            "Re-save the adapter with PEFT's save_pretrained(safe_serialization=True)" if pickled else ""))
    config = _from_peft_config(_read_json(config_path), config_path)
    metadata, tensors = read_safetensors(weights_path)
    check_hash(metadata, tensors, weights_path, key=HASH_META)  # folders lora_edu wrote carry one
    config["targets"], ours = _from_peft_keys(tensors, weights_path)
    return check_config(config, config_path), ours

