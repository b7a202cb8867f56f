"""Bad adapter files, fuzzed: every damaged file gets an AdapterFileError that names it.

For both formats (lora_edu's file and PEFT's folder): the file cut at every byte offset, bit
flips in the header and in the data, a header that declares far more data than the file holds,
metadata with wrong types or missing keys, and pickles given where safetensors is expected.
Each must raise AdapterFileError naming the file (never another exception), leave the model
as it was, and allocate nothing near what a forged header claims. The package itself must
never unpickle.
"""

import ast
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from _adapter_files import rewrite
from _models import assert_unchanged, snapshot
from lora_edu import AdapterFileError, inject_lora, load_adapter, read_adapter, save_adapter
from lora_edu.methods.adapters import FORMAT

ROOT = Path(__file__).resolve().parent.parent
DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"  # the local deep run (tests/conftest.py)


class Small(nn.Module):
    """One 4x4 target: its DoRA adapter at r = 1 is a 496-byte file, small enough to cut everywhere."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)


def base():
    torch.manual_seed(0)
    return Small()


def adapted():
    model = inject_lora(base(), ["q_proj"], r=1, alpha=2, dora=True)
    with torch.no_grad():
        model.q_proj.lora_B.normal_()
    return model


@pytest.fixture(params=["lora_edu", "peft"])
def saved(request, tmp_path):
    """(path given to load_adapter, the safetensors file inside it, the model that saved it)."""
    model = adapted()
    if request.param == "peft":
        save_adapter(model, tmp_path / "adapter", format="peft")
        return tmp_path / "adapter", tmp_path / "adapter" / "adapter_model.safetensors", model
    save_adapter(model, tmp_path / "adapter.safetensors")
    return tmp_path / "adapter.safetensors", tmp_path / "adapter.safetensors", model


def header_length(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]  # safetensors: u64 little-endian, then the JSON header


def assert_refused(path, name_in_message, models=None):
    """AdapterFileError (and nothing else) naming the file, for a bare and an adapted model,
    each left unchanged."""
    for model in models or (base(), adapted()):
        before = snapshot(model)
        with pytest.raises(AdapterFileError) as err:
            load_adapter(model, path)
        assert str(name_in_message) in str(err.value)
        assert_unchanged(model, before)


# ------------------------------------------------------------------ truncation and bit flips
def test_truncated_at_every_byte(saved):
    path, weights, _ = saved
    raw = weights.read_bytes()
    assert len(raw) < 600
    for n in range(len(raw)):
        weights.write_bytes(raw[:n])
        assert_refused(path, weights, models=[base()])
    weights.write_bytes(raw)
    load_adapter(base(), path)  # the whole file still loads


def test_peft_config_truncated_at_every_byte(tmp_path):
    path = tmp_path / "adapter"
    save_adapter(adapted(), path, format="peft")
    config = path / "adapter_config.json"
    raw = config.read_bytes()
    for n in range(len(raw)):
        config.write_bytes(raw[:n])
        assert_refused(path, config, models=[base()])


@pytest.mark.parametrize("region", ["header", "data"])
def test_every_single_bit_flip_is_caught(saved, region):
    """One seeded bit in every byte of the header, and 300 seeded bits of the data (every bit of
    every byte under HYPOTHESIS_PROFILE=deep): the content hash, the exact set of metadata keys
    and safetensors' own header checks leave no flip that loads silently."""
    path, weights, _ = saved
    raw = weights.read_bytes()
    start = 8 + header_length(raw)
    rng = random.Random(0)
    if DEEP:
        flips = [(i, b) for i in (range(start) if region == "header" else range(start, len(raw))) for b in range(8)]
    elif region == "header":
        flips = [(i, rng.randrange(8)) for i in range(start)]
    else:
        flips = [(rng.randrange(start, len(raw)), rng.randrange(8)) for _ in range(300)]
    silent = []
    for offset, bit in flips:
        damaged = bytearray(raw)
        damaged[offset] ^= 1 << bit
        weights.write_bytes(bytes(damaged))
        model = base()
        try:
            load_adapter(model, path)
        except AdapterFileError as err:
            assert str(weights) in str(err)
        else:
            silent.append((offset, bit))
    # the only flips that may load are in our PEFT export's own hash key, "lora_edu.sha256": PEFT
    # metadata is not ours to police, so the file is then read as an unhashed PEFT file, and
    # its tensors are untouched (a second flip would be needed to change them unnoticed)
    for offset, bit in silent:
        assert raw[offset - 20: offset + 20].find(b"lora_edu.sha256") >= 0, (offset, bit)
        damaged = bytearray(raw)
        damaged[offset] ^= 1 << bit
        weights.write_bytes(bytes(damaged))
        model, original = base(), adapted()
        load_adapter(model, path)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert not silent or path != weights  # in lora_edu's own format, not one flip loads


# ------------------------------------------------------------------ forged headers
def forged(path, header: dict, data: bytes = b"", declared_length: int | None = None):
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    n = len(body) if declared_length is None else declared_length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def place(tmp_path, where):
    """(what load_adapter is given, the safetensors file to forge): a lone file, or the weights
    of an otherwise valid PEFT folder."""
    if where == "file":
        return tmp_path / "forged.safetensors", tmp_path / "forged.safetensors"
    save_adapter(adapted(), tmp_path / "adapter", format="peft")
    return tmp_path / "adapter", tmp_path / "adapter" / "adapter_model.safetensors"


@pytest.mark.parametrize("where", ["file", "peft folder"])
@pytest.mark.parametrize("case", ["tensor of 400 GB", "header of 2**62 bytes", "offsets past the end",
                                  "overlapping tensors", "unknown dtype"])
def test_forged_header_is_refused(tmp_path, case, where):
    meta = {"format": FORMAT if where == "file" else "pt"}
    small = {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]}
    header, length = {"__metadata__": meta, "q_proj.lora_A": small}, None
    if case == "tensor of 400 GB":
        header["q_proj.lora_A"] = {"dtype": "F32", "shape": [100_000, 1_000_000], "data_offsets": [0, 4 * 10**11]}
    elif case == "header of 2**62 bytes":
        length = 2**62
    elif case == "offsets past the end":
        header["q_proj.lora_A"] = {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16_000]}
    elif case == "overlapping tensors":
        header["q_proj.lora_B"] = {"dtype": "F32", "shape": [4, 1], "data_offsets": [8, 24]}
    else:
        header["q_proj.lora_A"] = dict(small, dtype="F17")
    path, weights = place(tmp_path, where)
    forged(weights, header, bytes(16), length)
    assert_refused(path, weights)


def test_forged_header_allocates_nothing_near_its_claim(tmp_path):
    # in a fresh process, so that the peak resident size measures this load alone
    path = forged(tmp_path / "huge.safetensors",
                  {"__metadata__": {"format": FORMAT},
                   "q_proj.lora_A": {"dtype": "F32", "shape": [100_000, 1_000_000], "data_offsets": [0, 4 * 10**11]}},
                  bytes(64))
    script = (
        "import resource, sys, torch\n"
        "from torch import nn\n"
        "from lora_edu import AdapterFileError, load_adapter\n"
        "torch.zeros(1)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_adapter(nn.Sequential(nn.Linear(4, 4)), sys.argv[1])\n"
        "except AdapterFileError:\n"
        "    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    grown_kib = int(subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                                   check=True, cwd=ROOT).stdout)
    assert grown_kib < 20_000  # well under 20 MB, against the 400 GB the header declares


# ------------------------------------------------------------------ metadata with wrong types or missing keys
@pytest.mark.parametrize("changes, match", [
    (dict(r='"1"'), "r must be a positive int"),
    (dict(r="1.0"), "r must be a positive int"),
    (dict(r="0"), "r must be a positive int"),
    (dict(r="true"), "r must be a positive int"),
    (dict(r="1000000000000000000000000"), r"'r': 1000000000000000000000000, .*which no layer|another config.*'r': \(10+, 1\)"),
    (dict(alpha="null"), "alpha must be a positive, finite number"),
    (dict(alpha='"2"'), "alpha must be a positive, finite number"),
    (dict(dropout="-0.5"), "dropout must be a probability"),
    (dict(rslora='"no"'), "records an invalid adapter config: rslora='no'; it must be true or false"),
    (dict(method='"vera"'), "unknown adapter method 'vera'"),
    (dict(targets='"q_proj"'), "records targets='q_proj'; it must be a non-empty list"),
    (dict(targets="[]"), "it must be a non-empty list"),
    (dict(targets="[3]"), "it must be a non-empty list"),
    (dict(targets='["k_proj"]'), r"adapts \['k_proj'\]"),
    (dict(r="not json"), "incomplete adapter config.*JSONDecodeError"),
    (dict(format="lora_edu.adapter.v1", alpha=None, sha256=None), "incomplete adapter config.*KeyError"),
    (dict(sha256=None), "has metadata keys"),
    (dict(extra='"1"'), "has metadata keys"),
    (dict(format='"lora_edu.adapter.v2"'), "is not a lora_edu adapter"),
])
def test_metadata_with_wrong_types_or_missing_keys(tmp_path, changes, match):
    path = tmp_path / "adapter.safetensors"
    save_adapter(adapted(), path)
    rewrite(path, **changes)
    for model in (base(), adapted()):
        before = snapshot(model)
        with pytest.raises(AdapterFileError, match=match) as err:
            load_adapter(model, path)
        assert str(path) in str(err.value)
        assert_unchanged(model, before)


def test_a_changed_value_with_the_old_hash_is_corruption(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_adapter(adapted(), path)
    rewrite(path, rehash=False, alpha="3.0")  # alpha 2 -> 3, hash kept
    assert_refused(path, "does not match the content hash recorded when it was saved")


def test_files_from_before_the_hash_still_load(tmp_path):
    path = tmp_path / "adapter.safetensors"
    model = adapted()
    save_adapter(model, path)
    rewrite(path, format="lora_edu.adapter.v1", sha256=None)
    loaded = load_adapter(base(), path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


# ------------------------------------------------------------------ pickles are never opened
@pytest.mark.parametrize("name", ["adapter.bin", "adapter.pt", "adapter.safetensors", "in a peft folder"])
@pytest.mark.parametrize("zipped", [True, False])
def test_pickle_given_for_safetensors(tmp_path, monkeypatch, name, zipped):
    import pickle

    path, weights = place(tmp_path, "peft folder") if name == "in a peft folder" else (tmp_path / name,) * 2
    torch.save({"q_proj.lora_A": torch.zeros(1, 4)}, weights, _use_new_zipfile_serialization=zipped)

    def forbidden(*args, **kwargs):
        raise AssertionError("lora_edu must never unpickle")
    for owner, attr in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(owner, attr, forbidden)
    assert_refused(path, "is a pickle (torch.save) file, not safetensors. lora_edu never unpickles")
    with pytest.raises(AdapterFileError, match="is a pickle"):
        read_adapter(weights)


BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
TORCH_LOADERS = {"torch", "torch.serialization"}


def unpickling_sites(code: str) -> list[str]:
    """Lines of `code` that import a pickling module or reach torch.load: "line: what"."""
    sites = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            sites += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in BANNED_MODULES:
                sites.append(f"{node.lineno}: from {module}")
            sites += [f"{node.lineno}: from {module} import load" for a in node.names
                      if module in TORCH_LOADERS and a.name == "load"]
        elif isinstance(node, ast.Attribute) and node.attr == "load" and ast.unparse(node.value) in TORCH_LOADERS:
            sites.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(sites, key=lambda site: int(site.split(":")[0]))


def test_the_checker_finds_every_way_to_unpickle():
    code = ("import pickle\nfrom torch import load\nimport torch\nx = torch.load('f')\n"
            "from torch.serialization import load as l\nimport dill.settings\ny = torch.serialization.load\n"
            "z = json.load(f)\n")
    assert [s.split(":")[0] for s in unpickling_sites(code)] == ["1", "2", "4", "5", "6", "7"]


def test_the_package_never_calls_torch_load_or_pickle():
    offenders = [f"{source.relative_to(ROOT)}:{site}" for source in sorted((ROOT / "lora_edu").rglob("*.py"))
                 for site in unpickling_sites(source.read_text())]
    assert offenders == []


def test_a_folder_given_as_a_lora_edu_file(tmp_path):
    with pytest.raises(AdapterFileError, match="is a folder; a lora_edu adapter is one .safetensors file"):
        read_adapter(tmp_path)
    assert_refused(tmp_path, "has no adapter_config.json")  # load_adapter reads a folder as PEFT's
