#!/usr/bin/env bash
# Build the web book into _build/html, from a clean clone:
#   bash scripts/build_book.sh
# 1. a virtual environment in .venv with the pins of requirements.txt and lora_edu;
# 2. book/fetch_assets.py: pinned MathJax, require.js and the ipywidgets HTML manager,
#    fetched with `npm pack` into book/_static/offline/ so the pages load nothing from a CDN
#    (and axe-core, which only the browser test loads, into .cache/test-assets/);
# 3. jupyter-book, re-reading every page (--all) so that every warning shows, with
#    warnings as errors (-W -n --keep-going): the script exits non-zero on any warning.
# There is no separate post-processing step: book/_ext/offline_pages.py (a Sphinx hook
# listed in _config.yml) drops the one CDN stylesheet matplotlib's to_jshtml links and
# fails the build if any page would still load something from another host, and
# book/_ext/accessible_pages.py fixes what the accessibility audit found in generated markup.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi

echo "== installing requirements.txt and lora_edu into .venv"
.venv/bin/pip install --quiet -r requirements.txt -e .

echo "== offline assets"
command -v npm >/dev/null || { echo "npm is needed to fetch the offline assets (apt-get install npm)" >&2; exit 1; }
.venv/bin/python book/fetch_assets.py

echo "== building the book"
.venv/bin/jupyter-book build . --all -W -n --keep-going
test -f _build/html/index.html
echo "== the book is in _build/html (open _build/html/index.html)"
