"""Rewriting a saved lora_edu adapter file on purpose, for the tests of what loading refuses.

The content hash is recomputed after the change, so that the check a test aims at is the one
for that change (a missing tensor, a wrong type), not the hash, which would catch it first.
"""

from __future__ import annotations

from safetensors import safe_open
from safetensors.torch import save_file

from lora_edu.methods.safe_files import HASH_KEY, content_hash


def rewrite(path, tensors=None, rehash=True, **metadata_changes):
    """Change the file at `path` in place: `tensors(dict) -> dict` edits the tensors; each
    keyword sets a metadata entry (None removes it); rehash=False keeps the old hash, as a
    corrupted file would. Returns `path`."""
    with safe_open(str(path), "pt") as f:
        meta, saved = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if tensors is not None:
        saved = tensors(saved)
    for key, value in metadata_changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    if rehash and HASH_KEY in meta:
        meta[HASH_KEY] = content_hash(meta, saved)
    save_file(saved, str(path), metadata=meta)
    return path
