"""How long each book notebook takes to execute, relative to a notebook that only imports.

    python benchmarks/notebook_times.py [--repeats 3] [--max-ratio 1.5] [--cells 5]

Every notebook in notebooks/ and book/ is executed with nbclient, each in a fresh kernel
with its own folder as the working directory, `--repeats` times; the table shows the
median wall time (kernel start and shutdown included) and its ratio to a "floor" notebook
that only imports torch, matplotlib.pyplot and ipywidgets. The floor notebook is generated
in a temporary folder for this run and never written into the repository.

A chapter notebook (notebooks/*.ipynb) whose ratio exceeds --max-ratio makes the script
exit with status 1. --cells N also lists each notebook's N slowest cells (median seconds
over the repeats), which is where to look first when a chapter is over budget. This is a
benchmark, not a test: timings depend on the machine and on whatever else it is running,
so no test calls it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.channels import HBChannel
from nbclient import NotebookClient
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent

# nbclient stops the kernel's heartbeat thread at shutdown, and that thread beats once per
# HBChannel.time_to_dead (1 s): every total was rounded up to a whole second after the
# kernel's start, which moved a ratio by up to 1 s / floor (about 0.2 here). A tenth of a
# second keeps the rounding below the run-to-run noise.
HBChannel.time_to_dead = 0.1
FLOOR_SOURCE = "import torch\nimport matplotlib.pyplot as plt\nimport ipywidgets as widgets"


def time_notebook(path: Path, timeout: int) -> tuple[float, dict[int, float]]:
    """Seconds to execute `path` once, in a fresh kernel with its folder as cwd, and per code cell."""
    nb = nbformat.read(path, as_version=4)
    cells, marks = {}, {}

    def started(cell, cell_index):
        marks["cell"] = time.perf_counter()

    def executed(cell, cell_index, execute_reply):
        cells[cell_index] = time.perf_counter() - marks["cell"]

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_start=started, on_cell_executed=executed)
    start = time.perf_counter()
    # starts a kernel, runs every cell, shuts the kernel down; the kernel's own log lines (not
    # cell output, which travels over ZMQ) would only interleave with the progress bar
    client.execute(stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, cells


def write_notebook(folder: Path, name: str, source: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / name
    nbformat.write(nb, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="executions per notebook (median is shown)")
    parser.add_argument("--max-ratio", type=float, default=1.5,
                        help="fail if a chapter notebook takes more than this times the floor")
    parser.add_argument("--timeout", type=int, default=600, help="per-cell timeout in seconds")
    parser.add_argument("--cells", type=int, default=0, help="also list each notebook's N slowest cells")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    chapters = sorted((ROOT / "notebooks").glob("*.ipynb"))
    pages = sorted((ROOT / "book").glob("*.ipynb"))
    with tempfile.TemporaryDirectory() as tmp:
        floor = write_notebook(Path(tmp), "floor.ipynb", FLOOR_SOURCE)
        notebooks = [floor, *chapters, *pages]
        times = {nb: [] for nb in notebooks}
        cell_times = {nb: {} for nb in notebooks}  # {notebook: {cell index: [seconds, ...]}}
        sources = {nb: nbformat.read(nb, as_version=4).cells for nb in notebooks}  # (the floor's folder goes)
        # Round-robin over the notebooks, so that a slow spell of the machine hits all alike.
        jobs = [nb for _ in range(args.repeats) for nb in notebooks]
        for nb in tqdm(jobs, desc="executing notebooks", unit="run"):
            total, cells = time_notebook(nb, args.timeout)
            times[nb].append(total)
            for index, seconds in cells.items():
                cell_times[nb].setdefault(index, []).append(seconds)

    medians = {nb: statistics.median(t) for nb, t in times.items()}
    floor_s = medians[floor]
    names = {floor: "(floor: imports only)", **{nb: str(nb.relative_to(ROOT)) for nb in [*chapters, *pages]}}
    width = max(len(n) for n in names.values())
    print(f"\n{'notebook':<{width}}  {'median s':>8}  {'ratio':>6}")
    for nb in notebooks:
        print(f"{names[nb]:<{width}}  {medians[nb]:8.2f}  {medians[nb] / floor_s:6.2f}")
    print(f"(median of {args.repeats} run(s) each; ratio = median / floor median)")
    for nb in notebooks if args.cells else ():
        slowest = sorted(((statistics.median(t), i) for i, t in cell_times[nb].items()), reverse=True)
        print(f"\n{names[nb]}: slowest cells (median s), of {sum(m for m, _ in slowest):.2f} s in cells")
        for seconds, i in slowest[:args.cells]:
            first = next((line for line in sources[nb][i].source.splitlines() if line.strip()), "")
            print(f"  cell {i:3d}  {seconds:6.2f}  {first[:70]}")

    too_slow = [nb for nb in chapters if medians[nb] / floor_s > args.max_ratio]
    if too_slow:
        for nb in too_slow:
            print(f"TOO SLOW: {names[nb]} takes {medians[nb] / floor_s:.2f}x the floor "
                  f"(limit --max-ratio {args.max_ratio}); trim its experiments, frames or dpi.",
                  file=sys.stderr)
        return 1
    print(f"every chapter notebook is within {args.max_ratio}x the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
