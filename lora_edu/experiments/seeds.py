"""Reading stored runs seed by seed, as the chapters do.

Each setting of code/scaling_sweeps.py ran with several seeds; seed s draws the batches and
s - 1 the adapters, so two settings run with the same seed share their batches and initial
draws. A chapter reads a setting as {seed: value}, summarises it by its mean and its spread
(max - min over the seeds), and says that one setting beats another only if it does so for
every seed: a paired comparison, which can hold even when the gap is smaller than either
setting's spread, and which three seeds support only modestly.
"""

from __future__ import annotations


def pick(runs, group: str, **config) -> list[dict]:
    """The runs of one sweep (`group`) whose settings equal `config`, in stored order."""
    return [run for run in runs if run["group"] == group and all(run[k] == v for k, v in config.items())]


def per_seed(runs, group: str, key: str = "final", seeds=None, **config) -> dict:
    """{seed: run[key]} of one setting; with `seeds`, every one of them must be there exactly once."""
    chosen = pick(runs, group, **config)
    if seeds is not None and sorted(run["seed"] for run in chosen) != sorted(seeds):
        raise ValueError(f"{group} {config}: stored seeds {sorted(run['seed'] for run in chosen)}, "
                         f"expected {sorted(seeds)}; is the config complete (every key that varies in the sweep)?")
    return {run["seed"]: run[key] for run in chosen}


def mean(values) -> float:
    """Mean of a {seed: value} dict or of any iterable of numbers."""
    values = list(values.values() if isinstance(values, dict) else values)
    if not values:
        raise ValueError("mean of nothing: no stored runs matched")
    return sum(values) / len(values)


def spread(by_seed: dict) -> float:
    """max - min over the seeds: how far the same setting moves with other batches and initial draws."""
    return max(by_seed.values()) - min(by_seed.values())


def below(a: dict, b: dict) -> bool:
    """a ends lower than b for every seed (paired by seed); both must hold the same seeds."""
    if a.keys() != b.keys():
        raise ValueError(f"paired comparison needs the same seeds, got {sorted(a)} and {sorted(b)}")
    return all(a[s] < b[s] for s in a)


def show(by_seed: dict, digits: int = 3) -> str:
    """'mean [spread]' over the seeds."""
    return f"{mean(by_seed):.{digits}f} [{spread(by_seed):.{digits}f}]"
