"""Keep every notebook's first cell, the Colab-only install of lora_edu, in step with _config.yml.

The repository URL lives in one place, `repository.url` in _config.yml. This script writes
the install cell from it into each notebook (`--write`) or checks that every notebook has it
(default; tests/test_notebooks.py runs the check). The cell is tagged `remove-cell`, so the web
book hides it, and it does nothing outside Colab.

    python scripts/colab_cell.py            # check, exit 1 on a mismatch
    python scripts/colab_cell.py --write    # fix the notebooks in place
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_GLOBS = ("notebooks/*.ipynb", "book/*.ipynb")


def repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def install_cell_source() -> str:
    return ("# Colab only: install lora_edu (the repository URL is set once, in _config.yml)\n"
            "import sys\n"
            'if "google.colab" in sys.modules:\n'
            f'    %pip install -q "lora-edu @ git+{repository_url()}"')


def notebooks() -> list:
    return sorted(p for pattern in NOTEBOOK_GLOBS for p in ROOT.glob(pattern))


def problems() -> list:
    """One message per notebook whose first cell is not the current install cell."""
    wanted, found = install_cell_source(), []
    for path in notebooks():
        first = json.loads(path.read_text())["cells"][0]
        source = "".join(first["source"]) if isinstance(first["source"], list) else first["source"]
        if first["cell_type"] != "code" or source != wanted:
            found.append(f"{path.relative_to(ROOT)}: first cell is not the Colab install cell for {repository_url()}")
        elif "remove-cell" not in first.get("metadata", {}).get("tags", []):
            found.append(f"{path.relative_to(ROOT)}: the Colab install cell must be tagged remove-cell")
    return found


def write() -> None:
    import nbformat

    for path in notebooks():
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0]
        if first.cell_type == "code" and first.source.startswith("# Colab only"):
            first.source = install_cell_source()
        else:
            first = nbformat.v4.new_code_cell(install_cell_source())
            nb.cells.insert(0, first)
        first.metadata["tags"] = sorted(set(first.metadata.get("tags", [])) | {"remove-cell"})
        nbformat.write(nb, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the cell in every notebook")
    if parser.parse_args().write:
        write()
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
