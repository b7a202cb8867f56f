"""Results too slow to recompute in a chapter, stored with the package so Colab has them too.

    scaling_sweeps.json   code/scaling_sweeps.py (chapter 2's fine-tuning sweeps, CPU)
    memory_gpu.json       code/measure_memory.py (chapter 4's measured GPU peaks, an H200)
    dora_sweeps.json      code/dora_sweeps.py (chapter 5's fine-tuning runs, CPU)
    dora_speed.json       benchmarks/dora.py --out (chapter 5's GPU timings of the DoRA and LoRA layers, an H200)
    dora_speed_cpu.json   benchmarks/dora.py --device cpu --out (the same layers timed on a CPU)

Each script rewrites its file; a test checks the file against the script or the ledger.
"""

from __future__ import annotations

import json
from importlib import resources


def load(name: str) -> dict:
    """The stored results `name` (a file name above, without .json) as a dict."""
    files = sorted(p.name.removesuffix(".json") for p in resources.files(__name__).iterdir()
                   if p.name.endswith(".json"))
    if name not in files:
        raise ValueError(f"no stored results named {name!r}; there are: {', '.join(files)}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
