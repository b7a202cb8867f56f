"""The notebooks as files: committed executed, in the table of contents, citing real entries.

Their outputs are checked by strict nbval (see scripts/test.sh); this file checks what nbval
does not: hygiene, the Colab install cell, the toc and the bibliography.
"""

import json
import re
import runpy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted([*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("book/*.ipynb")])
colab_cell = runpy.run_path(str(ROOT / "scripts" / "colab_cell.py"))


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for entry in toc.get("chapters", []) + [c for p in toc.get("parts", []) for c in p["chapters"]]:
        files.append(entry["file"])
    return files


def test_there_are_notebooks():
    assert ROOT / "notebooks" / "01_lora_from_scratch.ipynb" in NOTEBOOKS


def test_colab_install_cell_matches_config():
    assert colab_cell["problems"]() == []
    assert "git+" + colab_cell["repository_url"]() in colab_cell["install_cell_source"]()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_executed(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert None not in counts, f"{path.name}: some code cells were never run"
    assert counts == sorted(counts), f"{path.name}: cells stored out of order"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name}: stored error output"
    assert path.stat().st_size < 2_000_000, f"{path.name} is {path.stat().st_size} bytes; keep figures small"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_seeded_and_imports_lora_edu(path):
    sources = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "code")
    assert "lora_edu" in sources
    if "torch.randn" in sources or "torch.rand(" in sources:
        assert "manual_seed" in sources, f"{path.name} draws random numbers without a seed"


def test_every_notebook_is_in_the_toc():
    toc = set(_toc_files())
    for path in NOTEBOOKS:
        assert str(path.relative_to(ROOT).with_suffix("")) in toc


def test_citations_exist_and_carry_arxiv_ids():
    bib = (ROOT / "references.bib").read_text()
    entries = dict(re.findall(r"@\w+\{([^,\s]+),(.*?)\n\}", bib, flags=re.S))
    assert entries, "references.bib has no entries"
    for key, body in entries.items():
        assert re.search(r"eprint\s*=\s*\{\d{4}\.\d{4,5}\}", body), f"{key} has no arXiv id"
    pages = [*NOTEBOOKS, *ROOT.glob("book/*.md")]
    cited = {k.strip() for p in pages for keys in re.findall(r"\{cite[:a-z]*\}`([^`]+)`", p.read_text())
             for k in keys.split(",")}
    assert cited, "no page cites anything"
    assert cited <= set(entries), f"cited but not in references.bib: {sorted(cited - set(entries))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_page_title_has_no_maths(path):
    """Titles appear in every page's sidebar, and pages without maths load no MathJax to typeset them."""
    first = next(_source(c) for c in _cells(path) if c["cell_type"] == "markdown")
    title = next(line for line in first.splitlines() if line.startswith("# "))
    assert "$" not in title, f"{path.name}: write the title in plain text or Unicode, not maths: {title}"


def _alt_texts(path):
    """(cell index, alt text) of every figure's alt (cell metadata) and frame player's FRAME_ALT."""
    for i, cell in enumerate(_cells(path)):
        alt = cell.get("metadata", {}).get("mystnb", {}).get("image", {}).get("alt")
        if alt:
            yield i, alt
        match = re.search(r"FRAME_ALT = \(([^)]*)\)", _source(cell))
        if match:
            yield i, "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(1)))


def _text_outputs(path):
    """Everything a reader can read in the notebook besides the alt texts: sources, text outputs."""
    parts = []
    for cell in _cells(path):
        parts.append(_source(cell))
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for kind in ("text/plain", "text/markdown"):
                parts.append("".join(out.get("data", {}).get(kind, "")))
    return "\n".join(parts)


NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?")  # 8, 0.824, 2,048


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_numbers_in_alt_texts_are_the_chapters_own(path):
    """An alt text is prose the reader hears: each number in it must be one the notebook computes
    and shows (in a text output) or sets (in its code), so that a re-run which moves a figure
    cannot leave a stale number behind in the alt text. Numbers are compared as written."""
    shown = set(NUMBER.findall(_text_outputs(path)))
    stale = [(i, n) for i, alt in _alt_texts(path) for n in NUMBER.findall(alt) if n not in shown]
    assert stale == []


def test_the_alt_text_number_check_sees_a_number_it_does_not_know():
    assert NUMBER.findall("from 1.454 at r = 1 to 0.806, 2,048 tokens, 46%, r = 1024, x2") == \
        ["1.454", "1", "0.806", "2,048", "46", "1024"]
