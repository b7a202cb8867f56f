"""The stored layer benchmarks (lora_edu/data/dora_speed*.json) are what benchmarks/dora.py writes.

Timings cannot be re-measured in a test, but everything around them can: the sizes and layers
are the script's, each median is the median of its stored rounds, and the bytes autograd saves
for each layer (deterministic) are what the layers save today, recomputed on the CPU sizes.
"""

from __future__ import annotations

import runpy
import statistics
from pathlib import Path

import pytest
import torch

from lora_edu.data import load
from lora_edu.memory.measure import saved_activations

ROOT = Path(__file__).resolve().parents[1]
bench = runpy.run_path(str(ROOT / "benchmarks" / "dora.py"), run_name="dora_benchmark")
LAYERS = ["nn.Linear, frozen"] + [f"{who} {name}{mode}" for name in ("LoRA", "DoRA")
                                  for who, mode in (("lora_edu", ""), ("lora_edu", ", bf16 bypass"),
                                                    ("PEFT", ""), ("PEFT", ", autocast"))]
STORED = {"dora_speed": (bench["GPU_SIZES"], ["bf16"]), "dora_speed_cpu": (bench["CPU_SIZES"], ["fp32", "bf16"])}


@pytest.mark.parametrize("name", sorted(STORED))
def test_stored_benchmark_has_the_scripts_sizes_layers_and_medians(name):
    run = load(name)
    sizes, dtypes = STORED[name]
    stored_dtypes = list(dict.fromkeys(s["base_dtype"] for s in run["sizes"]))  # --dtype may pick one
    assert stored_dtypes and set(stored_dtypes) <= set(dtypes)
    assert [(s["out"], s["in"], s["tokens"], s["r"], s["base_dtype"]) for s in run["sizes"]] == \
        [(*size, dtype) for dtype in stored_dtypes for size in sizes]
    for size in run["sizes"]:
        assert sorted(size["layers"]) == sorted(LAYERS)
        for layer in size["layers"].values():
            for mode in ("sync", "back_to_back"):
                assert len(layer[f"{mode}_ms"]) == run["rounds"]
                assert layer[f"median_{mode}_ms"] == statistics.median(layer[f"{mode}_ms"])
    assert run["peft"] and run["date"] and run["device"]


def test_the_cpu_run_saved_the_bytes_the_layers_save_today():
    pytest.importorskip("peft")
    run = load("dora_speed_cpu")
    for size in [s for s in run["sizes"] if s["base_dtype"] == "fp32"]:  # bf16 matmuls are slow on some CPUs
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[size["base_dtype"]]
        layers = bench["make_layers"](size["out"], size["in"], size["r"], dtype, "cpu")
        x = torch.randn(size["tokens"], size["in"], dtype=dtype, requires_grad=True)
        for name, layer in layers.items():
            saved = saved_activations(layer, layer, x)[1]
            assert sum(s.nbytes for s in saved) == size["layers"][name]["saved_bytes"], (size["r"], name)
