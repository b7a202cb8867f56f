"""LoRA and DoRA layers against HF PEFT's, forward + backward, measured in the same run.

    python benchmarks/dora.py                   # CUDA if there is a GPU, else the CPU
    python benchmarks/dora.py --device cpu --out result.json

Every layer wraps a copy of one frozen nn.Linear without a bias (bf16 on a GPU; float32 and
bf16 on a CPU) with float32 adapters, and runs y = layer(x), y.backward(g) with x requiring a
gradient, as a layer inside a network does. Layers are timed round-robin, so that a slow
moment of the machine hits them all alike; the figure is the median over the rounds (CUDA
events on a GPU, perf_counter on a CPU) of two timings per round: one step with the GPU idle
before and after it ("sync", which adds the Python time of launching every kernel to the
GPU's), and five steps queued back to back (as in a training loop, where the GPU works on one
kernel while Python launches the next), divided by five. The back-to-back figure is the one
the ratios use. Beside the time: the bytes
autograd keeps for the backward (saved_tensors_hooks) and, on a GPU, the step's peak memory
above what was allocated before it.

Rows: the frozen layer alone; lora_edu's LoRALinear and DoRALinear with the bypass in float32
(the default, PEFT's) and in bf16 (bypass_dtype=torch.bfloat16); PEFT's LoRA and DoRA as they
run by default, and under torch.autocast(bfloat16), which is how PEFT runs its bypass in bf16.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_edu import DoRALinear, LoRALinear  # noqa: E402
from lora_edu.experiments.runner import cpu_name  # noqa: E402
from lora_edu.memory.measure import saved_activations  # noqa: E402

BACK_TO_BACK = 5  # steps queued without waiting, as a training loop queues its layers
GPU_SIZES = [(4096, 4096, 8192, 8), (4096, 4096, 8192, 64), (8192, 8192, 4096, 16)]  # out, in, tokens, r
CPU_SIZES = [(1024, 1024, 2048, 8), (1024, 1024, 2048, 64), (2048, 2048, 1024, 16)]


class _Wrap(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


class _Autocast(nn.Module):
    def __init__(self, layer, device_type):
        super().__init__()
        self.layer, self.device_type = layer, device_type

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.layer(x)


def peft_layer(base: nn.Linear, r: int, dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0, use_dora=dora)
    return get_peft_model(_Wrap(copy.deepcopy(base)), config).base_model.model.proj


def make_layers(out_f: int, in_f: int, r: int, dtype: torch.dtype, device: str) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
    layers = {"nn.Linear, frozen": base}
    for cls, name in ((LoRALinear, "LoRA"), (DoRALinear, "DoRA")):
        layers[f"lora_edu {name}"] = cls(copy.deepcopy(base), r=r, alpha=2 * r)
        layers[f"lora_edu {name}, bf16 bypass"] = cls(copy.deepcopy(base), r=r, alpha=2 * r,
                                                      bypass_dtype=torch.bfloat16)
        layers[f"PEFT {name}"] = peft_layer(base, r, dora=name == "DoRA")
        layers[f"PEFT {name}, autocast"] = _Autocast(peft_layer(base, r, dora=name == "DoRA"), device)
    for layer in layers.values():
        for p in layer.parameters():
            if p.requires_grad:
                with torch.no_grad():
                    p.normal_(0, 0.02)  # as after training (B = 0 costs the same, but say so)
    return layers


def _step(layer, x, g):
    layer(x).backward(g)
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def measure(layers: dict, tokens: int, in_f: int, out_f: int, dtype, device: str, rounds: int, warmup: int,
            progress=None) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    g = torch.randn(tokens, out_f, device=device, dtype=dtype, generator=gen)
    cuda = device.startswith("cuda")
    results = {}
    for name, layer in layers.items():
        _, saved = saved_activations(layer, layer, x)
        peak = None
        for _ in range(warmup):
            _step(layer, x, g)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _step(layer, x, g)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        results[name] = {"sync_ms": [], "back_to_back_ms": [], "saved_bytes": sum(s.nbytes for s in saved), "peak_extra_bytes": peak}
    for _ in range(rounds):
        for name, layer in layers.items():
            for mode, steps in (("sync", 1), ("back_to_back", BACK_TO_BACK)):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    start.record()
                    for _ in range(steps):
                        _step(layer, x, g)
                    end.record()
                    torch.cuda.synchronize()
                    ms = start.elapsed_time(end) / steps
                else:
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        _step(layer, x, g)
                    ms = (time.perf_counter() - t0) * 1e3 / steps
                results[name][f"{mode}_ms"].append(ms)
        if progress is not None:
            progress.update(1)
    for r in results.values():
        for mode in ("sync", "back_to_back"):
            r[f"median_{mode}_ms"] = statistics.median(r[f"{mode}_ms"])
    return results


def table(run: dict, mode: str = "back_to_back") -> str:
    """A markdown table: median ms per layer, with the ratios the DoRA chapter and the README quote."""
    names = list(run["sizes"][0]["layers"])
    ratios = {"DoRA bf16 / PEFT DoRA": ("lora_edu DoRA, bf16 bypass", "PEFT DoRA"),
              "DoRA / PEFT DoRA": ("lora_edu DoRA", "PEFT DoRA"),
              "LoRA / PEFT LoRA": ("lora_edu LoRA", "PEFT LoRA"),
              "LoRA bf16 / frozen": ("lora_edu LoRA, bf16 bypass", "nn.Linear, frozen")}
    head = "| layer, tokens, r | " + " | ".join(names + list(ratios)) + " |"
    rows = [head, "|" + "---|" * (len(names) + len(ratios) + 1)]
    for size in run["sizes"]:
        ms = {n: size["layers"][n][f"median_{mode}_ms"] for n in names}
        label = f"{size['out']}x{size['in']}, {size['tokens']}, r={size['r']}"
        cells = [f"{ms[n]:.2f}" for n in names] + [f"{ms[a] / ms[b]:.2f}" for a, b in ratios.values()]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="the frozen base's dtype (default: bf16 on a GPU, both fp32 and bf16 on a CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 50 on a GPU, 7 on a CPU)")
    parser.add_argument("--out", type=Path, help="write the run as JSON here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    dtypes = [args.dtype] if args.dtype else (["bf16"] if cuda else ["fp32", "bf16"])
    rounds = args.rounds or (50 if cuda else 7)
    sizes = GPU_SIZES if cuda else CPU_SIZES
    from tqdm.auto import tqdm

    run = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if cuda else
           cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "rounds": rounds, "sizes": []}
    try:
        import peft

        run["peft"] = peft.__version__
    except ImportError:
        parser.error("this benchmark compares against HF PEFT: pip install peft")
    with tqdm(total=rounds * len(sizes) * len(dtypes), desc="rounds") as bar:
        for dtype_name in dtypes:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
            for out_f, in_f, tokens, r in sizes:
                layers = make_layers(out_f, in_f, r, dtype, args.device)
                result = measure(layers, tokens, in_f, out_f, dtype, args.device, rounds, warmup=5 if cuda else 1,
                                 progress=bar)
                run["sizes"].append({"out": out_f, "in": in_f, "tokens": tokens, "r": r, "base_dtype": dtype_name,
                                     "layers": result})
                del layers
    for dtype_name in dtypes:
        for mode, how in (("back_to_back", f"{BACK_TO_BACK} steps queued back to back"),
                          ("sync", "one step at a time, waiting for each")):
            print(f"\n{run['device']}, torch {run['torch']}, PEFT {run['peft']}, base {dtype_name}, {how}, "
                  f"median of {rounds} rounds, ms per forward + backward")
            print(table({"sizes": [s for s in run["sizes"] if s["base_dtype"] == dtype_name]}, mode))
    if args.out:
        args.out.write_text(json.dumps(run, indent=1))
    return run


if __name__ == "__main__":
    main()
