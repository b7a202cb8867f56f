"""Run the family chapter's fine-tuning sweeps and write them to a JSON file.

    python code/family_sweeps.py --jobs 16                # everything: 126 runs, about 30 core-minutes
    python code/family_sweeps.py --quick --out x.json     # the subset tests/test_family_sweeps.py re-runs

Every run fine-tunes the pretrained tiny transformer (lora_edu.pretrained_model) on the FINETUNE
task for 300 steps with one member of the LoRA family (lora_edu.experiments.family says which
and how: r = 8, alpha = 16, on q_proj and v_proj; (IA)^3 on k, v and down), at seeds 1, 2, 3
(seed s draws the batches, s - 1 the adapters), one thread per process. Groups:

  grid       every method at learning rates 1e-3, 3e-3, 1e-2, 3e-2 and 1e-1: the chapter compares
             each at its own best rate, since the methods' updates differ in size by design
  full       full fine-tuning at 1e-3, chapter 2's best, as the reference
  adalora_all  AdaLoRA on all seven linears of both layers at 1e-2, to see where it puts the rank

and, without training: the singular values of the pretrained q and v weights and of what PiSSA
leaves in the base, and the cosine of each method's first step with the full gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lora_edu import FINETUNE, evaluate, pretrained_model
from lora_edu.experiments.family import ALPHA, R, finetune_method, first_step_alignment
from lora_edu.experiments.runner import cpu_name, rounded, run_all, sweep_main
from lora_edu.experiments.scaling import QV_TARGETS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "lora_edu" / "data" / "family_sweeps.json"
STEPS, SEEDS = 300, (1, 2, 3)
GRID_METHODS = ("lora", "rslora", "dora", "pissa", "loraga", "adalora", "loraplus", "ia3")
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
FULL_LR, ADALORA_ALL_LR = 1e-3, 1e-2
ALIGNED = ("lora", "rslora", "dora", "pissa", "loraga", "loraplus")  # their first steps, against the full gradient
ALIGN_LR = 1e-3
#: the matrices the spectra are taken of: the adapted ones, in both layers
TRACKED = tuple(f"layers.{i}.self_attn.{t}" for i in range(2) for t in QV_TARGETS)


def jobs() -> list[tuple[str, str, dict]]:
    """Every run as (key, group, finetune_method kwargs), in the order they are stored."""
    out = []
    for seed in SEEDS:
        out.append((f"full seed={seed}", "full", dict(method="full", lr=FULL_LR, seed=seed)))
        for method in GRID_METHODS:
            for lr in LRS:
                out.append((f"grid {method} lr={lr:g} seed={seed}", "grid", dict(method=method, lr=lr, seed=seed)))
        out.append((f"adalora_all seed={seed}", "adalora_all",
                    dict(method="adalora", lr=ADALORA_ALL_LR, seed=seed, all_linear_adalora=True)))
    return out


QUICK_KEYS = ("grid pissa lr=0.01 seed=1", "grid loraga lr=0.01 seed=1", "grid adalora lr=0.01 seed=1",
              "grid ia3 lr=0.1 seed=1", "grid loraplus lr=0.001 seed=1")


def run_one(job):
    key, group, kwargs = job
    torch.set_num_threads(1)
    return key, {"group": group, **finetune_method(steps=STEPS, **kwargs)}


def spectra() -> dict:
    """{matrix: {"w0": singular values of W0, "residual": of PiSSA's residual W0 - s B0 A0}}."""
    from lora_edu.methods.pissa import inject_pissa

    model = pretrained_model()
    start = {name: model.get_submodule(name).weight.detach().double() for name in TRACKED}
    inject_pissa(model, list(QV_TARGETS), r=R, alpha=ALPHA)
    return {name: {"w0": torch.linalg.svdvals(w0).tolist(),
                   "residual": torch.linalg.svdvals(model.get_submodule(name).base.weight.detach().double()).tolist()}
            for name, w0 in start.items()}


def run(quick: bool = False, progress: bool = True, n_jobs: int = 1) -> dict:
    torch.set_num_threads(1)
    start = {"finetune": evaluate(pretrained_model(), FINETUNE)}
    selected = [job for job in jobs() if not quick or job[0] in QUICK_KEYS]
    runs = dict(run_all(run_one, selected, n_jobs, progress))
    alignment = {f"{method} seed={seed}": first_step_alignment(method, lr=ALIGN_LR, seed=seed)
                 for method in ALIGNED for seed in (SEEDS[:1] if quick else SEEDS)}
    return rounded({"meta": {"steps": STEPS, "curve_every": 10, "quick": quick, "r": R, "alpha": ALPHA,
                             "lrs": list(LRS), "align_lr": ALIGN_LR, "torch": torch.__version__, "cpu": cpu_name(),
                             "seeds": list(SEEDS), "tracked": list(TRACKED)},
                    "start": start, "spectra": spectra(), "alignment": alignment, "runs": runs})


def main(argv=None) -> int:
    return sweep_main(argv, __doc__.split("\n\n")[0], DEFAULT_OUT, f"only the runs {', '.join(QUICK_KEYS)}", run)


if __name__ == "__main__":
    sys.exit(main())
