"""Execute book notebooks in place, to commit their outputs:

    python scripts/execute_notebooks.py [NOTEBOOK ...]     # default: every page of the book

Each notebook runs in a fresh kernel in its own folder (`jupyter execute --inplace`, which
also stores the widget state the web page needs), with LORA_EDU_WRITING_OUTPUTS=1: then
lora_edu.steady asks every printed figure to sit three measured spreads away from a rounding
boundary, so that the stored text reproduces on a reader's CPU. Strict nbval re-runs the
notebooks in scripts/test.sh and compares what this script stored.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted([*ROOT.glob("notebooks/*.ipynb"),
                                                             *ROOT.glob("book/*.ipynb")])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    env = {**os.environ, "LORA_EDU_WRITING_OUTPUTS": "1"}
    jupyter = Path(sys.executable).with_name("jupyter")
    for path in tqdm(paths, desc="executing", unit="notebook"):
        done = subprocess.run([str(jupyter), "execute", "--inplace", path.name], cwd=path.parent, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            print(f"{path.relative_to(ROOT)} failed; its file was left as it was", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
