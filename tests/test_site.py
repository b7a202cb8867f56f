"""Browser test of the built book (_build/html), offline.

The site is served on 127.0.0.1 and opened in headless Debian chromium; every request to
any other host is recorded and aborted, so a passing run proves the pages need no CDN.
Checks, for every page listed in _toc.yml: no console errors and no failed requests;
maths typeset by the local MathJax; Colab and .ipynb download links on notebook pages;
scripts served by the site itself. On the first chapter, the kernel-free slider of
matplotlib's to_jshtml animation changes the frame shown.

Build first (scripts/build_book.sh), then: pytest tests/test_site.py
"""

import functools
import os
import http.server
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

playwright_sync = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--no-first-run",
]
HOST = "127.0.0.1"


# ---------------------------------------------------------------- the book's own config
def _toc_files(entries) -> list[str]:
    """Files of a _toc.yml subtree, in reading order (chapters, parts, sections)."""
    files = []
    for entry in entries or []:
        if "file" in entry:
            files.append(str(Path(entry["file"]).with_suffix("")))
        for key in ("parts", "chapters", "sections"):
            files += _toc_files(entry.get(key))
    return files


TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
PAGES = [str(Path(TOC["root"]).with_suffix(""))] + _toc_files([TOC])
FIRST_CHAPTER = PAGES[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def colab_url(page: str) -> str:
    """The Colab launch URL the theme should build for `page` from _config.yml."""
    repo = CONFIG["repository"]
    org_and_name = urlparse(repo["url"]).path.strip("/")
    path = "/".join(p for p in (repo.get("path_to_book", "").strip("/"), page) if p)
    base = CONFIG["launch_buttons"]["colab_url"].rstrip("/")
    return f"{base}/github/{org_and_name}/blob/{repo['branch']}/{path}.ipynb"


def is_notebook(page: str) -> bool:
    return (ROOT / f"{page}.ipynb").exists()


# ---------------------------------------------------------------- server and browser
@pytest.fixture(scope="session")
def site_url():
    if not (SITE / "index.html").exists():
        if os.environ.get("CI"):  # CI builds the book first; a missing site is a failure there
            pytest.fail("_build/html/index.html is missing: scripts/test.sh builds it before the tests")
        pytest.skip("the book is not built: run scripts/build_book.sh first "
                    "(_build/html/index.html is missing)")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), functools.partial(Quiet, directory=SITE))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{HOST}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def chromium():
    assert CHROMIUM.exists(), "browser test needs Debian's chromium: apt-get install -y chromium"
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Visit:
    """One page opened in the browser, with everything that went wrong while loading."""

    def __init__(self, browser, url: str):
        self.console_errors, self.failed, self.offsite = [], [], []
        self.page = browser.new_page()
        self.page.route("**/*", self._only_localhost)
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.url} ({r.status})"))
        self.page.goto(url, wait_until="load")
        if self.has_maths:
            self.page.evaluate("() => MathJax.startup.promise")
        if self.has_widgets:  # the HTML manager renders saved widget state after load
            try:
                self.page.wait_for_selector(".jupyter-widgets", state="attached", timeout=10_000)
            except playwright_sync.TimeoutError:
                self.console_errors.append("saved widget state was not rendered within 10 s")
        self.page.wait_for_load_state("networkidle")

    def _only_localhost(self, route):
        if urlparse(route.request.url).hostname == HOST:
            route.continue_()
        else:
            self.offsite.append(route.request.url)
            route.abort()

    @property
    def has_maths(self) -> bool:
        return self.page.locator("script[src*='mathjax']").count() > 0

    @property
    def has_widgets(self) -> bool:
        return self.page.locator("script[type='application/vnd.jupyter.widget-state+json']").count() > 0

    def script_srcs(self) -> list[str]:
        return self.page.eval_on_selector_all("script[src]", "els => els.map(e => e.src)")


@pytest.fixture(scope="session")
def visit(chromium, site_url):
    """visit(page) opens a toc page once per session and returns its Visit."""
    cache = {}

    def open_page(page: str) -> Visit:
        if page not in cache:
            cache[page] = Visit(chromium, f"{site_url}/{page}.html")
        return cache[page]

    yield open_page
    for v in cache.values():
        v.page.close()


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("page", PAGES)
def test_page_loads_offline_without_errors(visit, page):
    v = visit(page)
    assert not v.offsite, f"{page} requested other hosts: {v.offsite}"
    assert not v.console_errors, f"{page} console errors: {v.console_errors}"
    assert not v.failed, f"{page} failed requests: {v.failed}"


@pytest.mark.parametrize("page", PAGES)
def test_maths_is_typeset(visit, page):
    v = visit(page)
    if not v.has_maths:
        pytest.skip(f"{page} has no maths")
    assert v.page.locator("mjx-container").count() > 0, f"{page}: MathJax typeset nothing"
    assert v.page.locator("mjx-merror").count() == 0, f"{page}: MathJax reported a TeX error"


def test_book_has_maths(visit):
    assert any(visit(p).has_maths for p in PAGES), "no page loads MathJax"


@pytest.mark.parametrize("page", [p for p in PAGES if is_notebook(p)])
def test_notebook_has_colab_and_download_links(visit, page):
    v = visit(page)
    colab = colab_url(page)
    assert v.page.locator(f"a[href='{colab}']").count() > 0, f"{page}: no link to {colab}"
    download = v.page.locator(f"a[href$='_sources/{page}.ipynb']")
    assert download.count() > 0, f"{page}: no .ipynb download link"
    assert (SITE / "_sources" / f"{page}.ipynb").is_file()


@pytest.mark.parametrize("page", PAGES)
def test_scripts_are_served_by_the_site(visit, page):
    v = visit(page)
    srcs = v.script_srcs()
    offsite = [s for s in srcs if urlparse(s).hostname != HOST]
    assert not offsite, f"{page} has scripts from other hosts: {offsite}"
    if v.page.locator("div.math, span.math").count():
        assert any("mathjax" in s for s in srcs), f"{page} has maths but no MathJax script"
    if v.has_widgets:
        for name in ("require.js", "embed-amd.js"):
            assert any(name in s for s in srcs), f"{page} has widgets but no {name}"


def test_kernel_free_slider_changes_the_frame(visit):
    page = visit(FIRST_CHAPTER).page
    animation = page.locator("div.animation").first
    assert animation.count() == 1, f"{FIRST_CHAPTER} has no to_jshtml animation"
    slider, image = animation.locator("input[type=range]"), animation.locator("img").first
    page.wait_for_function("s => Number(s.max) > 0", arg=slider.element_handle())
    before = image.evaluate("img => img.src")
    assert before, "the animation shows no frame"
    slider.evaluate("""s => {
        s.value = s.max;
        s.dispatchEvent(new Event('input', {bubbles: true}));
        s.dispatchEvent(new Event('change', {bubbles: true}));
    }""")
    after = image.evaluate("img => img.src")
    assert after and after != before, "moving the slider did not change the frame"
