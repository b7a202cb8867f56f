"""Reading and writing adapter tensors safely: safetensors only, a content hash, typed configs.

Both adapter layouts (lora_edu's file, adapters.py; PEFT's folder, peft_files.py) go through
here. safetensors stores raw tensors behind a JSON header, so reading never runs code, and it
checks the header (its length, the JSON, every tensor's offsets against the file's size)
before reading data. What it lacks, a checksum, is the content hash below: sha256 over the
metadata and every tensor's bytes, recorded on save and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .registry import adapter_class

HASH_KEY = "sha256"


class AdapterFileError(ValueError):
    """An adapter file or folder that cannot be loaded as it is; the message names it and why."""


# ------------------------------------------------------------------ reading and writing safetensors
def content_hash(metadata: dict, tensors: dict, skip: str = HASH_KEY) -> str:
    """sha256 over the metadata strings (all but the hash itself, `skip`) and every tensor's key,
    dtype, shape and bytes, in sorted order, so that it does not depend on the order in the file."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != skip):
        h.update(json.dumps([key, metadata[key]]).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_safetensors(tensors: dict, path: str, metadata: dict) -> None:
    """save_file into a temporary name, then rename: a failed save leaves no half-written file."""
    from safetensors.torch import save_file

    partial = path + ".partial"
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file, or an AdapterFileError naming the file.

    safetensors checks the header (its length, the JSON, every tensor's offsets against the
    file's size) before it reads any data, so a file that claims more than it holds fails
    here without allocating; a pickle (torch.save's .bin/.pt) is recognised and never opened.
    """
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise AdapterFileError(f"{path!r} is a folder; a lora_edu adapter is one .safetensors file "
                               "(a PEFT adapter folder holds adapter_config.json: pass that folder to load_adapter)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path!r}; save one with save_adapter(model, path)")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] != b"{" and (head.startswith(b"\x80") or head.startswith(b"PK\x03\x04")):
        raise AdapterFileError(f"{path!r} is a pickle (torch.save) file, not safetensors. lora_edu never "
                               "unpickles: loading a pickle can run any code. Convert it to safetensors "
                               "where you trust its source, e.g. with PEFT's save_pretrained.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path!r} is not a readable safetensors adapter file (truncated or "
                               f"corrupt?): {err}") from err
    return metadata, tensors


def check_hash(metadata: dict, tensors: dict, path: str, key: str = HASH_KEY) -> None:
    """Raise if the file records a content hash (under `key`) that its contents no longer match.
    A file without one (PEFT's own, or saved before hashes) is not checked."""
    if key in metadata and content_hash(metadata, tensors, skip=key) != metadata[key]:
        raise AdapterFileError(f"{path!r} does not match the content hash recorded when it was saved: "
                               "the file was changed or corrupted since. Save the adapter again from "
                               "its model, or fetch a fresh copy of the file.")


def check_config(config: dict, path: str) -> dict:
    """The config, if its method is known and every value has the right type and range (the
    method's layer class says which); an AdapterFileError otherwise."""
    try:
        adapter_class(config.get("method")).check_config(config)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{path!r} records an invalid adapter config: {err}") from None
    targets = config["targets"]
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise AdapterFileError(f"{path!r} records targets={targets!r}; it must be a non-empty list of module names")
    return config
