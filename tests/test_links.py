"""Every internal link of the built book resolves (_build/html), checked on the HTML itself.

For every page of the site, every href and src that points into the site (links, scripts,
stylesheets, images, frames) must name a file that exists, and every #fragment must be an
id (or an <a name>) on the page it points to: a link from one chapter to a heading of
another goes to a heading that exists. Links to other hosts are not followed here
(tests/test_site.py proves that no page loads anything from them).

Sphinx's own checks do not cover this. `jupyter-book build -n` warns about a MyST link or
{ref} to a missing document or label while it builds, but not about raw HTML in cell
outputs, nor links the theme writes; and `sphinx -b linkcheck` reports local links as
"local" without opening them. So this test reads the pages a reader gets.

Build first (scripts/build_book.sh), then: pytest tests/test_links.py
"""

import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"

# (tag, attribute) pairs that make the browser fetch or navigate to a URL. (Not <form action>:
# the one form on these pages, the radio buttons of matplotlib's frame player, is never submitted.)
LINK_ATTRS = {("a", "href"), ("area", "href"), ("link", "href"), ("script", "src"), ("img", "src"),
              ("iframe", "src"), ("source", "src"), ("audio", "src"), ("video", "src"), ("video", "poster"),
              ("embed", "src"), ("track", "src"), ("object", "data")}
NOT_IN_SITE = ("http:", "https:", "mailto:", "data:", "javascript:", "tel:", "blob:")


class _Page(HTMLParser):
    """The ids (anchors) of one page and the URLs it links to, with their line numbers."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for name, value in attrs.items():
            if (tag, name) in LINK_ATTRS and value is not None:
                self.links.append((value.strip(), self.getpos()[0], tag))

    handle_startendtag = handle_starttag


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    page.close()
    return page


def broken_links(site: Path) -> list[str]:
    """'page:line: <tag> url (why)' for every link of an HTML page under `site` that does not resolve.

    Pages under _static/ are the theme's and libraries' own files and are not checked, but
    links into _static/ are.
    """
    site = site.resolve()
    pages = {p.resolve(): None for p in sorted(site.rglob("*.html")) if "_static" not in p.relative_to(site).parts}
    parsed = {}

    def anchors(path: Path) -> set[str]:
        if path not in parsed:
            parsed[path] = _parse(path)
        return parsed[path].ids

    problems = []
    for page in pages:
        for url, line, tag in _parse(page).links:
            where = f"{page.relative_to(site)}:{line}: <{tag}> {url}"
            if not url or url.lower().startswith(NOT_IN_SITE) or url.startswith("//"):
                continue  # another host, or inline data: not a file of the site
            parts = urlsplit(url)
            if parts.scheme:
                problems.append(f"{where} (unknown scheme {parts.scheme!r})")
                continue
            if parts.path:
                base = site if parts.path.startswith("/") else page.parent
                target = Path(os.path.normpath(base / unquote(parts.path).lstrip("/")))
                if target.is_dir():
                    target = target / "index.html"
                if site not in target.parents:
                    problems.append(f"{where} (outside the site)")
                    continue
                if not target.is_file():
                    problems.append(f"{where} (no file {target.relative_to(site)})")
                    continue
            else:
                target = page  # "#fragment" alone: this page
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html" and fragment not in anchors(target):
                problems.append(f"{where} (no id {fragment!r} on {target.relative_to(site)})")
    return problems


# ---------------------------------------------------------------- the built book
def test_every_internal_link_and_anchor_resolves():
    if not (SITE / "index.html").exists():
        if os.environ.get("CI"):
            pytest.fail("_build/html/index.html is missing: scripts/test.sh builds it before the tests")
        pytest.skip("the book is not built: run scripts/build_book.sh first")
    problems = broken_links(SITE)
    assert not problems, f"{len(problems)} broken internal links:\n" + "\n".join(problems[:50])


# ---------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_checker_passes_a_sound_site(tmp_path):
    site = _write(tmp_path, {
        "index.html": '<a href="notebooks/02.html#which-rank">rank</a> <a href="#top" id="top">top</a>'
                      ' <a href="https://example.org/x#y">elsewhere</a> <img src="data:image/png;base64,AA">'
                      ' <a href="book/">folder</a> <a href="mailto:a@b.c">mail</a> <a href="#">no fragment</a>',
        "notebooks/02.html": '<section id="which-rank"><h2>Which rank</h2></section>'
                             '<a href="../_images/plot%20one.png">image</a>'
                             '<link rel="stylesheet" href="../_static/site.css?v=1">',
        "_images/plot one.png": "",
        "_static/site.css": "",
        "_static/theme.html": '<a href="missing.html">the theme\'s own page, not checked</a>',
        "book/index.html": '<a name="old-style">named anchor</a><a href="../index.html#top">back</a>'
                           '<a href="#old-style">up</a>',
    })
    assert broken_links(site) == []


def test_checker_finds_each_kind_of_broken_link(tmp_path):
    site = _write(tmp_path, {
        "index.html": '<a href="notebooks/02.html#no-such-heading">a heading that is not there</a>\n'
                      '<a href="notebooks/03.html">a chapter that is not there</a>\n'
                      '<img src="_images/gone.png" alt="">\n'
                      '<a href="#nowhere">an anchor of this page that is not there</a>\n'
                      '<script src="/_static/gone.js"></script>\n'
                      '<a href="../../etc/passwd">outside the site</a>\n',
        "notebooks/02.html": '<section id="which-rank"><h2>Which rank</h2></section>',
    })
    problems = broken_links(site)
    assert len(problems) == 6, problems
    for expected in ("no id 'no-such-heading' on notebooks/02.html", "no file notebooks/03.html",
                     "no file _images/gone.png", "no id 'nowhere' on index.html", "no file _static/gone.js",
                     "(outside the site)"):
        assert any(expected in p for p in problems), (expected, problems)
