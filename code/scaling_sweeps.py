"""Run the fine-tuning sweeps of the scaling-and-rank chapter and write them to a JSON file.

    python code/scaling_sweeps.py                       # all sweeps, about 3.5 minutes on one CPU core
    python code/scaling_sweeps.py --quick --out x.json  # the subset tests/test_scaling.py re-runs

Every run fine-tunes the same pretrained tiny transformer (lora_edu.pretrained_model) on the
FINETUNE task with fixed seeds and one thread, so a run gives the same numbers whenever it is
repeated on the same machine; the stored values are rounded to 5 significant digits. --quick
runs a subset of the same runs with the same settings: on the machine that wrote the file its
entries equal the stored ones, and on another CPU they differ by up to a few per cent (the
pretraining and fine-tuning go through other kernels), within tests/test_scaling.py's TOLERANCE.

Sweeps (the chapter reads them by their `group`):
  grad_norm    the adapter's gradient norm at step 1, r = 1 .. 1024, alpha / r and alpha / sqrt(r)
  scaling      r = 4 .. 256 x both scalings, alpha = 16, at two learning rates
  targets      q | q,v | q,k,v,o | all linear layers, at (nearly) the same number of trainable parameters
  rank         r = 1 .. 64 on q,v with alpha = 2r (the same scale s = 2 at every rank)
  lr           LoRA (q,v, r = 8) and full fine-tuning, each over the same learning rates
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from lora_edu import LLAMA_TARGETS
from lora_edu.experiments.scaling import finetune, step1_grad_norm

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "lora_edu" / "data" / "scaling_sweeps.json"
SIG = 5  # significant digits stored: enough for the chapter, robust to last-bit differences

STEPS = 300
GRAD_RANKS = tuple(2 ** i for i in range(11))  # 1 .. 1024
SCALING_RANKS = (4, 16, 64, 256)
SCALING_LRS = (1e-3, 3e-3)
# equal budget: r * sum over layers of (d + k) is 10240 for q, q,v and q,k,v,o; all-linear at r = 4 has 9760
TARGET_SETS = {"q": (("q_proj",), 40), "q,v": (("q_proj", "v_proj"), 20),
               "q,k,v,o": (("q_proj", "k_proj", "v_proj", "o_proj"), 10), "all linear": (LLAMA_TARGETS, 4)}
RANK_SWEEP = (1, 2, 4, 8, 16, 32, 64)
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
OTHER_LR = 3e-3  # for the targets and rank sweeps: train()'s default learning rate


def jobs() -> list[tuple[str, str, dict]]:
    """Every fine-tuning run as (key, group, finetune kwargs), in the order they run."""
    out = []
    for lr in SCALING_LRS:
        for r in SCALING_RANKS:
            for rslora in (False, True):
                out.append((f"scaling lr={lr:g} r={r} rslora={rslora}", "scaling",
                            dict(r=r, alpha=16, rslora=rslora, lr=lr)))
    for name, (targets, r) in TARGET_SETS.items():
        out.append((f"targets {name} r={r}", "targets", dict(r=r, alpha=2 * r, targets=targets, lr=OTHER_LR)))
    for r in RANK_SWEEP:
        out.append((f"rank r={r}", "rank", dict(r=r, alpha=2 * r, lr=OTHER_LR)))
    for lr in LRS:
        out.append((f"lr lora lr={lr:g}", "lr", dict(r=8, alpha=16, lr=lr)))
        out.append((f"lr full lr={lr:g}", "lr", dict(r=None, lr=lr)))
    return out


#: the runs --quick repeats: the smallest rank of the scaling sweep, both scalings
QUICK_KEYS = ("scaling lr=0.001 r=4 rslora=False", "scaling lr=0.001 r=4 rslora=True")


def rounded(value):
    """Round floats (also inside lists and dicts) to SIG significant digits; NaN/inf become None."""
    if isinstance(value, float):
        return float(f"{value:.{SIG}g}") if math.isfinite(value) else None
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def run(quick: bool = False, progress: bool = True) -> dict:
    torch.set_num_threads(1)  # one thread: faster on these tiny tensors, and the same bits every run
    grad_norms = {scheme: [step1_grad_norm(r, alpha=16, rslora=scheme == "rslora") for r in GRAD_RANKS]
                  for scheme in ("lora", "rslora")}
    selected = [job for job in jobs() if not quick or job[0] in QUICK_KEYS]
    runs = {}
    for key, group, kwargs in tqdm(selected, desc="fine-tuning runs", disable=not progress):
        runs[key] = {"group": group, **finetune(steps=STEPS, **kwargs)}
    return rounded({"meta": {"steps": STEPS, "curve_every": 10, "quick": quick, "torch": torch.__version__,
                             "grad_ranks": list(GRAD_RANKS)},
                    "grad_norm": grad_norms, "runs": runs})


def to_json(data: dict) -> str:
    """JSON with one line per run and per gradient-norm series: small, and readable in a diff."""
    lines = []
    for section, value in data.items():
        items = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
        lines.append(f"{json.dumps(section)}: {{\n" + ",\n".join(items) + "\n }")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file to write (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help=f"only the step-1 gradient norms and the runs {', '.join(QUICK_KEYS)} (about 15 s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    data = run(quick=args.quick, progress=not args.no_progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(data))
    print(f"wrote {len(data['runs'])} runs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
