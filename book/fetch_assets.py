"""Put pinned copies of the book's browser libraries under book/_static/offline/.

The built pages load MathJax (maths), require.js and the ipywidgets HTML manager
(saved widget state) from the site itself, never from a CDN, so the book works offline
and the browser test can forbid every request to another host.

The browser test's accessibility checker, axe-core, is fetched the same way but into
.cache/test-assets/, outside the published site: readers never load it, and
tests/test_site.py injects it into each page it audits.

Each package is fetched with the ordinary npm client (`npm pack NAME@VERSION`) into
.cache/npm/, checked against its pinned sha512 integrity, and only the files the pages
need are extracted. A stamp file makes a second run a no-op.

Usage: python book/fetch_assets.py
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "npm"
DEST = Path(__file__).resolve().parent / "_static" / "offline"
TEST_DEST = ROOT / ".cache" / "test-assets"
STAMP = DEST / "fetched.json"

# name@version -> (sha512 integrity of the tarball, {member prefix: destination folder}).
# Member prefixes are paths inside the tarball; a prefix ending in "/" takes a subtree.
PACKAGES = {
    "mathjax@3.2.2": (
        "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        {
            # The combined TeX-to-CommonHTML component Sphinx loads (mathjax_path) ...
            "package/es5/tex-chtml.js": "mathjax",
            # ... its web fonts, TeX extensions it autoloads (\boldsymbol, \color, ...),
            # and the pieces its context menu loads on demand (menu, accessibility, speech).
            "package/es5/output/chtml/": "mathjax/output/chtml",
            "package/es5/input/tex/extensions/": "mathjax/input/tex/extensions",
            "package/es5/ui/": "mathjax/ui",
            "package/es5/a11y/": "mathjax/a11y",
            "package/es5/sre/": "mathjax/sre",
            "package/LICENSE": "mathjax",
        },
    ),
    "requirejs@2.3.8": (
        "sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw==",
        {"package/require.js": "requirejs"},
    ),
    # html-manager 1.0.x is the one that renders ipywidgets 8 state (controls 2.x).
    "@jupyter-widgets/html-manager@1.0.15": (
        "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
        {
            # The AMD bundle myst-nb loads, its icon fonts (found next to the script),
            # and the licence notice of what it bundles.
            "package/dist/embed-amd.js": "html-manager",
            "package/dist/embed.js.LICENSE.txt": "html-manager",
            "package/dist/*.woff2": "html-manager",
            "package/dist/*.woff": "html-manager",
            "package/dist/*.ttf": "html-manager",
            "package/dist/*.eot": "html-manager",
            "package/dist/*.svg": "html-manager",
        },
    ),
}

# The same shape, for tools only the tests load (extracted under TEST_DEST).
TEST_PACKAGES = {
    # axe-core: the accessibility rules tests/test_site.py runs on every page.
    "axe-core@4.14.1": (
        "sha512-FHfa+lmNjQZfJz1q8wKqIDwC6DExcHt/pkjNQb09a3NPjCKg2rhu5qb2S4r76ASyFNNtuFooJpZe37OgudVGtQ==",
        {"package/axe.min.js": "axe-core", "package/LICENSE": "axe-core"},
    ),
}


def integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def tarball(spec: str, expected: str) -> Path:
    """Return the cached tarball of `spec`, running `npm pack` if it is not cached."""
    name, version = spec.rsplit("@", 1)
    # npm names a scoped package's tarball "scope-name-version.tgz".
    path = CACHE / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if path.exists() and integrity(path) == expected:
        print(f"  cached  {path.relative_to(ROOT)}")
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"  npm pack {spec}")
    subprocess.run(["npm", "pack", spec, "--pack-destination", str(CACHE), "--loglevel=warn"],
                   check=True, stdout=subprocess.DEVNULL)
    got = integrity(path)
    if got != expected:
        path.unlink()
        sys.exit(f"integrity mismatch for {spec}: expected {expected}, got {got}")
    return path


def wanted(member: str, rules: dict) -> str | None:
    """Destination path (relative to DEST) of a tarball member, or None to skip it."""
    for prefix, folder in rules.items():
        if prefix.endswith("/") and member.startswith(prefix):
            return f"{folder}/{member[len(prefix):]}"
        if "*" in prefix:
            head, tail = prefix.split("*")
            if member.startswith(head) and "/" not in member[len(head):] and member.endswith(tail):
                return f"{folder}/{Path(member).name}"
        if member == prefix:
            return f"{folder}/{Path(member).name}"
    return None


def extract(path: Path, rules: dict, dest: Path) -> int:
    count = 0
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            rel = wanted(member.name, rules) if member.isfile() else None
            if rel is None:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    return count


def main() -> None:
    groups = [(DEST, PACKAGES), (TEST_DEST, TEST_PACKAGES)]
    pins = {spec: sha for _, packages in groups for spec, (sha, _) in packages.items()}
    if (STAMP.exists() and json.loads(STAMP.read_text()) == pins
            and all(dest.is_dir() for dest, _ in groups)):
        print(f"offline assets up to date in {DEST.relative_to(ROOT)} and {TEST_DEST.relative_to(ROOT)}")
        return
    for dest, packages in groups:
        print(f"fetching offline assets into {dest.relative_to(ROOT)}")
        if dest.exists():
            shutil.rmtree(dest)  # start clean so no file of an older pin lingers
        for spec, (sha, rules) in packages.items():
            n = extract(tarball(spec, sha), rules, dest)
            print(f"  {spec}: {n} files")
    STAMP.write_text(json.dumps(pins, indent=1) + "\n")
    print("done")


if __name__ == "__main__":
    main()
