"""How far each figure of a notebook moves when the CPU takes another code path.

    python scripts/cpu_drift.py [NOTEBOOK ...] [--json drift.json] [--min-rel 1e-6]

Readers run the book on other CPUs (Intel, AMD, Apple Silicon, Colab) and other thread
counts, where MKL and ATen pick other kernels: sums are added in another order, and a
figure that went through a training loop moves in its third digit. This script executes
each notebook (default: every page of the book) in a fresh kernel under settings that force
other kernels on this machine, and reads back every float the notebook leaves in its global
namespace (also inside dicts, lists and tuples). It prints, per notebook, each float whose
largest relative spread over the settings exceeds --min-rel, largest first.

Use it when writing a chapter: the spread of a figure is the tolerance its assertion needs,
and printing it with lora_edu.steady(value, spec, rel=spread) refuses a format whose last
digit that spread could flip. Nothing in the test suite calls this script;
the suite instead re-runs strict nbval under the last setting (scripts/test.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name: environment overrides; each one moves training-loop figures on one machine
    "as is": {},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    # scripts/test.sh's second pass: all of them at once
    "second pass": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1"},
}
DUMP = r'''
import json as _json, math as _math
def _floats(value, prefix, out, depth=0):
    if isinstance(value, bool) or depth > 3:
        return
    if isinstance(value, float) and _math.isfinite(value):
        out[prefix] = value
    elif isinstance(value, dict) and len(value) <= 200:
        for k, v in value.items():
            _floats(v, f"{prefix}[{k!r}]", out, depth + 1)
    elif isinstance(value, (list, tuple)) and len(value) <= 200:
        for i, v in enumerate(value):
            _floats(v, f"{prefix}[{i}]", out, depth + 1)
_out = {}
for _name, _value in list(globals().items()):
    if not _name.startswith("_"):
        _floats(_value, _name, _out)
print("CPU_DRIFT_JSON" + _json.dumps(_out))
'''


def run(path: Path, env: dict[str, str], timeout: int) -> dict[str, float]:
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DUMP))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute(stderr=subprocess.DEVNULL)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    return json.loads(text.split("CPU_DRIFT_JSON", 1)[1])


def spread(values: list[float]) -> float:
    lo, hi = min(values), max(values)
    scale = max(abs(lo), abs(hi))
    return 0.0 if scale == 0 else (hi - lo) / scale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--json", type=Path, help="write every float under every setting here")
    parser.add_argument("--min-rel", type=float, default=1e-6, help="report spreads above this")
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted([*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("book/*.ipynb")])
    results = {}
    for path in tqdm(paths, desc="notebooks"):
        results[str(path)] = {name: run(path, env, args.timeout) for name, env in SETTINGS.items()}
    for path, by_setting in results.items():
        names = set.intersection(*(set(v) for v in by_setting.values()))
        rows = [(spread([by_setting[s][n] for s in SETTINGS]), n) for n in names]
        rows = sorted((r for r in rows if r[0] > args.min_rel and math.isfinite(r[0])), reverse=True)
        print(f"\n{path}: {len(names)} floats, {len(rows)} move by more than {args.min_rel:g}")
        for rel, name in rows:
            values = " ".join(f"{by_setting[s][name]:.6g}" for s in SETTINGS)
            print(f"  {rel:9.2e}  {name}  [{values}]")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
