"""Run the DoRA chapter's fine-tuning sweeps and write them to a JSON file.

    python code/dora_sweeps.py --jobs 16                 # everything: 63 runs, about 15 core-minutes
    python code/dora_sweeps.py --quick --out x.json      # the subset tests/test_dora_sweeps.py re-runs

Every run fine-tunes the pretrained tiny transformer (lora_edu.pretrained_model) on the FINETUNE
task for 300 steps with adapters on q_proj and v_proj (or every weight, for full fine-tuning),
at seeds 1, 2, 3 (seed s draws the batches, s - 1 the adapters), one thread per process, as
code/scaling_sweeps.py does; each run records its loss curve, its held-out loss and, every 25
steps, the magnitude and direction change (dM, dD) of q_proj and v_proj in both layers
(lora_edu.experiments.dora). Groups:

  full   full fine-tuning at 1e-3, the best learning rate of chapter 2's sweep
  rank   LoRA at r = 1, 2, 3, 4, 5, 8, 9, 16, 17 and DoRA at r = 1, 2, 4, 8, 16, at 1e-2 (chapter 2's
         best for LoRA on q, v, used for DoRA too, untuned): equal r, and LoRA at r + 1, which
         trains more parameters than DoRA at r (r (d + k) + d < (r + 1)(d + k))
  low_lr LoRA and DoRA at r = 1, 4, 16 at 1e-3, the second learning rate of the live figure
alpha = 16 under alpha / r throughout, as in chapter 2's rank sweep.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lora_edu import FINETUNE, evaluate, pretrained_model
from lora_edu.experiments.dora import Tracker
from lora_edu.experiments.runner import cpu_name, rounded, run_all, sweep_main
from lora_edu.experiments.scaling import QV_TARGETS, finetune

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "lora_edu" / "data" / "dora_sweeps.json"
STEPS, EVERY = 300, 25
SEEDS = (1, 2, 3)
FULL_LR, ADAPTER_LR, LOW_LR = 1e-3, 1e-2, 1e-3
LORA_RANKS = (1, 2, 3, 4, 5, 8, 9, 16, 17)
DORA_RANKS = (1, 2, 4, 8, 16)
LOW_LR_RANKS = (1, 4, 16)
#: the matrices whose magnitude and direction are followed: the adapted ones, in both layers
TRACKED = tuple(f"layers.{i}.self_attn.{t}" for i in range(2) for t in QV_TARGETS)


def jobs() -> list[tuple[str, str, dict]]:
    """Every run as (key, group, finetune kwargs), in the order they are stored."""
    out = []
    for seed in SEEDS:
        out.append((f"full seed={seed}", "full", dict(r=None, lr=FULL_LR, seed=seed)))
        for method, ranks in (("lora", LORA_RANKS), ("dora", DORA_RANKS)):
            for r in ranks:
                out.append((f"rank {method} r={r} seed={seed}", "rank",
                            dict(r=r, alpha=16, lr=ADAPTER_LR, seed=seed, dora=method == "dora")))
            for r in LOW_LR_RANKS:
                out.append((f"low_lr {method} r={r} seed={seed}", "low_lr",
                            dict(r=r, alpha=16, lr=LOW_LR, seed=seed, dora=method == "dora")))
    return out


QUICK_KEYS = ("rank lora r=4 seed=1", "rank dora r=4 seed=1", "full seed=1")


def run_one(job):
    key, group, kwargs = job
    torch.set_num_threads(1)
    tracker = Tracker(TRACKED, every=EVERY)
    record = finetune(steps=STEPS, callback=tracker, **kwargs)
    method = "full" if kwargs["r"] is None else ("dora" if kwargs.get("dora") else "lora")
    record.pop("dora", None)
    return key, {"group": group, "method": method, **record, "md": {str(k): v for k, v in tracker.points.items()}}


def run(quick: bool = False, progress: bool = True, n_jobs: int = 1) -> dict:
    torch.set_num_threads(1)
    start = {"finetune": evaluate(pretrained_model(), FINETUNE)}
    selected = [job for job in jobs() if not quick or job[0] in QUICK_KEYS]
    runs = dict(run_all(run_one, selected, n_jobs, progress))
    return rounded({"meta": {"steps": STEPS, "md_every": EVERY, "curve_every": 10, "quick": quick,
                             "torch": torch.__version__, "cpu": cpu_name(), "seeds": list(SEEDS),
                             "tracked": list(TRACKED)},
                    "start": start, "runs": runs})


def main(argv=None) -> int:
    return sweep_main(argv, __doc__.split("\n\n")[0], DEFAULT_OUT, f"only the runs {', '.join(QUICK_KEYS)}", run)


if __name__ == "__main__":
    sys.exit(main())
