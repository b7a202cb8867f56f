"""What the sweep scripts in code/ share: running seeded fine-tunes in worker processes and
storing their results as small, diff-friendly JSON.

Each run is one process with one thread, so a run gives the same numbers however many run
beside it; stored floats are rounded to a few significant digits, which is all a chapter
prints and what survives another CPU's kernels best.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


def run_all(fn, jobs: list, n_jobs: int = 1, progress: bool = True, desc: str = "fine-tuning runs") -> list:
    """[fn(job) for job in jobs], in worker processes if n_jobs > 1, with a progress bar."""
    from tqdm import tqdm

    if n_jobs < 1:
        raise ValueError(f"n_jobs must be at least 1, got {n_jobs}")
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        if n_jobs == 1:
            results = []
            for job in jobs:
                results.append(fn(job))
                bar.update()
            return results
        with ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn")) as pool:
            results = []
            for result in pool.map(fn, jobs):
                results.append(result)
                bar.update()
            return results


def cpu_name() -> str:
    """The CPU model, for the record: the stored figures move in their third digit on another one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rounded(value, sig: int = 5):
    """Round floats (also inside lists and dicts) to `sig` significant digits; NaN/inf become None."""
    if isinstance(value, float):
        return float(f"{value:.{sig}g}") if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [rounded(v, sig) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v, sig) for k, v in value.items()}
    return value


def to_json(data: dict) -> str:
    """JSON with one line per entry of each top-level section: small, and readable in a diff."""
    lines = []
    for section, value in data.items():
        items = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
        lines.append(f"{json.dumps(section)}: {{\n" + ",\n".join(items) + "\n }")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def sweep_main(argv, description: str, default_out: Path, quick_help: str, run) -> int:
    """The command line every sweep script in code/ has: --out, --quick, --jobs, --no-progress.

    run(quick=, progress=, n_jobs=) returns the data (with a "runs" section), written as to_json.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out, help=f"JSON file to write (default {default_out})")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one thread each (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    data = run(quick=args.quick, progress=not args.no_progress, n_jobs=args.jobs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(data))
    print(f"wrote {len(data['runs'])} runs to {args.out}")
    return 0
