"""Run the fine-tuning sweeps of the scaling-and-rank chapter and write them to a JSON file.

    python code/scaling_sweeps.py --jobs 16              # everything: 186 runs, about 45 core-minutes
    python code/scaling_sweeps.py --quick --out x.json   # the subset tests/test_scaling.py re-runs

Every run fine-tunes the same pretrained tiny transformer (lora_edu.pretrained_model) on the
FINETUNE task, three times with different seeds (seed s draws the batches, s - 1 the adapters'
initialisation), on one thread per process, so a run gives the same numbers whenever it is
repeated on the same machine, whatever --jobs is; the stored values are rounded to 5
significant digits. --quick runs a subset of the same runs with the same settings: on the
machine that wrote the file its entries equal the stored ones, and on another CPU they differ
by up to a few per cent (the pretraining and fine-tuning go through other kernels), within
tests/test_scaling.py's TOLERANCE.

Sweeps (the chapter reads them by their `group`), each at seeds 1, 2, 3:
  grad_norm    the adapter's gradient norm at step 1, r = 1 .. 1024, alpha / r and alpha / sqrt(r)
  scaling      r = 4 .. 256 x both scalings, alpha = 16, at four learning rates (1e-3 .. 3e-2)
  targets      q | q,v | q,k,v,o | all linear layers, at (nearly) the same number of trainable parameters
  rank         r = 1 .. 64 on q,v with alpha = 16 under alpha / r (the same s * r = 16 at every rank), lr 1e-2
  lr           LoRA (q,v, r = 8) and full fine-tuning, each over the same learning rates
  qlora        LoRA r = 8 on every linear layer over a float32, a bfloat16 and an NF4 base (QLoRA)
and, from those runs and the pretrained model:
  start        the pretrained model's held-out losses on both tasks, before any fine-tuning
  weights      the pretrained weights' excess kurtosis, and their histogram scaled by each block's absmax
  subspace     the singular values of full fine-tuning's updates, its loss with each update cut to
               rank k, and how much the top directions of the r = 8 and r = 64 adapters' updates
               share (Hu et al. section 7.2; Biderman et al. section 4.5 for the full updates)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lora_edu import FINETUNE, LLAMA_TARGETS, PRETRAIN, evaluate, pretrained_model
from lora_edu.experiments.scaling import QV_TARGETS, finetune, step1_grad_norm, truncate_updates, weight_deltas
from lora_edu.experiments.runner import cpu_name, rounded, run_all, sweep_main
from lora_edu.experiments.subspace import singular_values, subspace_similarity, top_directions

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "lora_edu" / "data" / "scaling_sweeps.json"
SIG = 5  # significant digits stored: enough for the chapter, robust to last-bit differences

STEPS = 300
SEEDS = (1, 2, 3)
GRAD_RANKS = tuple(2 ** i for i in range(11))  # 1 .. 1024
SCALING_RANKS = (4, 16, 64, 256)
# alpha / r at r = 256 scales the update 16x less than alpha / sqrt(r): the grid spans a factor 30,
# so that each scale can be compared at its own best learning rate
SCALING_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
# equal budget: r * sum over layers of (d + k) is 10240 for q, q,v and q,k,v,o; all-linear at r = 4 has 9760
TARGET_SETS = {"q": (("q_proj",), 40), "q,v": (("q_proj", "v_proj"), 20),
               "q,k,v,o": (("q_proj", "k_proj", "v_proj", "o_proj"), 10), "all linear": (LLAMA_TARGETS, 4)}
RANK_SWEEP = (1, 2, 4, 8, 16, 32, 64)
# the rank sweep keeps alpha = 16 under alpha / r, so s * r = 16 at every rank, at the learning rate that
# the scaling sweep found best for alpha / r at every rank: each doubling changes the rank, not the step
RANK_LR = 1e-2
LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
OTHER_LR = 3e-3  # for the targets and qlora sweeps: train()'s default learning rate
QLORA_BASES = ("fp32", "bf16", "nf4")
FULL_LR = 1e-3  # the full fine-tunes whose updates the subspace section takes apart
TRUNCATE_RANKS = (1, 2, 4, 8, 16, 32, 64)  # each full update cut to its best rank-k part, then evaluated
OVERLAP_RANKS = (8, 64)  # the LoRA paper compares r = 8 with r = 64
# the top directions compared on the larger side: the tiny model is 64 wide, so all 64 directions of
# an r = 64 update span the whole space and share everything with anything (phi = 1)
OVERLAP_COLUMNS = 16
BLOCK = 64  # NF4's block size, for the histogram of w / absmax in the weights section


def jobs() -> list[tuple[str, str, dict]]:
    """Every fine-tuning run as (key, group, finetune kwargs), in the order they are stored."""
    out = []
    for seed in SEEDS:
        for lr in SCALING_LRS:
            for r in SCALING_RANKS:
                for rslora in (False, True):
                    out.append((f"scaling lr={lr:g} r={r} rslora={rslora} seed={seed}", "scaling",
                                dict(r=r, alpha=16, rslora=rslora, lr=lr, seed=seed)))
        for name, (targets, r) in TARGET_SETS.items():
            out.append((f"targets {name} r={r} seed={seed}", "targets",
                        dict(r=r, alpha=2 * r, targets=targets, lr=OTHER_LR, seed=seed)))
        for r in RANK_SWEEP:
            out.append((f"rank r={r} seed={seed}", "rank", dict(r=r, alpha=16, lr=RANK_LR, seed=seed)))
        for lr in LRS:
            out.append((f"lr lora lr={lr:g} seed={seed}", "lr", dict(r=8, alpha=16, lr=lr, seed=seed)))
            out.append((f"lr full lr={lr:g} seed={seed}", "lr", dict(r=None, lr=lr, seed=seed)))
        for base in QLORA_BASES:
            out.append((f"qlora base={base} seed={seed}", "qlora",
                        dict(r=8, alpha=16, targets=LLAMA_TARGETS, lr=OTHER_LR, base=base, seed=seed)))
    return out


#: the runs --quick repeats: the smallest rank of the scaling sweep under both scalings, and the
#: full fine-tune whose update the subspace section measures
QUICK_KEYS = ("scaling lr=0.001 r=4 rslora=False seed=1", "scaling lr=0.001 r=4 rslora=True seed=1",
              f"lr full lr={FULL_LR:g} seed=1")


#: the runs whose weight updates the subspace section needs; the adapter pairs have different seeds
#: (runs with the same seed draw the same first rows of the first adapted matrix's A)
OVERLAP_RUNS = ("rank r=8 seed=1", "rank r=64 seed=2", "rank r=64 seed=3")


def keeps_update(key: str) -> bool:
    return key in OVERLAP_RUNS or key.startswith(f"lr full lr={FULL_LR:g} ")


def run_one(job):
    """One fine-tune in a worker process: (key, record, updates or None, truncated losses or None)."""
    key, group, kwargs = job
    torch.set_num_threads(1)  # one thread: faster on these tiny tensors, and the same bits every run
    record, model = finetune(steps=STEPS, return_model=True, **kwargs)
    full = kwargs["r"] is None
    targets = LLAMA_TARGETS if full else kwargs.get("targets", QV_TARGETS)
    updates = weight_deltas(model, targets) if keeps_update(key) else None
    truncated = ({k: evaluate(truncate_updates(model, k, LLAMA_TARGETS), FINETUNE) for k in TRUNCATE_RANKS}
                 if full and keeps_update(key) else None)
    return key, {"group": group, **record}, updates, truncated


def excess_kurtosis(x: torch.Tensor) -> float:
    """E[z^4] - 3 of the standardised values: 0 for a normal distribution, > 0 for heavier tails."""
    z = (x - x.mean()) / x.std(correction=0)
    return (z ** 4).mean().item() - 3


def weight_statistics() -> dict:
    """Excess kurtosis of each pretrained linear weight, and a histogram of w / c, c = absmax of its block."""
    model = pretrained_model()
    kurtosis, scaled = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            w = m.weight.detach().double().flatten()
            kurtosis[name] = excess_kurtosis(w)
            blocks = torch.nn.functional.pad(w, (0, -w.numel() % BLOCK)).view(-1, BLOCK)  # [n_blocks, 64]
            share = blocks / blocks.abs().amax(dim=1, keepdim=True)
            scaled.append(share.flatten()[: w.numel()])
    scaled = torch.cat(scaled)
    counts = torch.histc(scaled, bins=100, min=-1, max=1)
    pooled = torch.cat([m.weight.detach().double().flatten() for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name != "lm_head"])
    return {"kurtosis": kurtosis, "kurtosis_pooled": excess_kurtosis(pooled), "block": BLOCK,
            "scaled_histogram": [int(c) for c in counts.tolist()], "n": scaled.numel()}


def subspace_section(updates: dict, truncated: dict) -> dict:
    """Spectra of the full fine-tunes' updates, their losses cut to rank k, and overlaps of the top
    directions of the r = 8 and r = 64 adapters' updates."""
    full_key = f"lr full lr={FULL_LR:g}"
    spectra = {f"seed={seed}": {name: singular_values(d).tolist() for name, d in updates[f"{full_key} seed={seed}"].items()}
               for seed in SEEDS if f"{full_key} seed={seed}" in updates}
    cut = {f"seed={seed}": {str(k): loss for k, loss in truncated[f"{full_key} seed={seed}"].items()}
           for seed in SEEDS if f"{full_key} seed={seed}" in truncated}
    section = {"full_lr": FULL_LR, "full_spectrum": spectra, "full_truncated": cut}
    needed = [*OVERLAP_RUNS, f"{full_key} seed=2"]
    if not all(k in updates for k in needed):
        return section
    r8, r64a, r64b, full = (updates[k] for k in needed)
    section["lora_spectrum"] = {key: {name: singular_values(d).tolist()[:OVERLAP_COLUMNS] for name, d in updates[key].items()}
                                for key in OVERLAP_RUNS}
    low, high = OVERLAP_RANKS
    pairs = {f"r={low} seed=1 vs r={high} seed=2": (r8, r64a, low, OVERLAP_COLUMNS),
             f"r={high} seed=2 vs r={high} seed=3": (r64a, r64b, low, OVERLAP_COLUMNS),
             f"r={low} seed=1 vs full seed=2": (r8, full, low, OVERLAP_COLUMNS)}
    section["overlap"] = {
        label: {name: [[round(v, 4) for v in row] for row in
                       subspace_similarity(top_directions(a[name], i), top_directions(b[name], j)).tolist()]
                for name in a}
        for label, (a, b, i, j) in pairs.items()}
    return section


def run(quick: bool = False, progress: bool = True, n_jobs: int = 1) -> dict:
    torch.set_num_threads(1)
    grad_norms = {scheme: [step1_grad_norm(r, alpha=16, rslora=scheme == "rslora") for r in GRAD_RANKS]
                  for scheme in ("lora", "rslora")}
    base = pretrained_model()
    start = {"finetune": evaluate(base, FINETUNE), "pretrain": evaluate(base, PRETRAIN)}
    selected = [job for job in jobs() if not quick or job[0] in QUICK_KEYS]
    results = {key: result for key, *result in run_all(run_one, selected, n_jobs, progress)}
    runs = {key: results[key][0] for key, _, _ in selected}  # in jobs() order, whatever finished first
    updates = {key: u for key, (_, u, _) in results.items() if u is not None}
    truncated = {key: t for key, (_, _, t) in results.items() if t is not None}
    return rounded({"meta": {"steps": STEPS, "curve_every": 10, "quick": quick, "torch": torch.__version__,
                             "cpu": cpu_name(), "seeds": list(SEEDS), "grad_ranks": list(GRAD_RANKS)},
                    "grad_norm": grad_norms, "start": start, "weights": weight_statistics(),
                    "subspace": subspace_section(updates, truncated), "runs": runs}, SIG)


def main(argv=None) -> int:
    quick = f"only the step-1 gradient norms, the pretrained weights and the runs {', '.join(QUICK_KEYS)}"
    return sweep_main(argv, __doc__.split("\n\n")[0], DEFAULT_OUT, quick, run)


if __name__ == "__main__":
    sys.exit(main())
