"""Browser test of the built book (_build/html), offline.

The site is served on 127.0.0.1 and opened in headless Debian chromium; every request to
any other host is recorded and aborted, so a passing run proves the pages need no CDN.
Checks, for every page listed in _toc.yml: no console errors and no failed requests;
maths typeset by the local MathJax; Colab and .ipynb download links on notebook pages;
scripts served by the site itself; no serious or critical accessibility violation found by
axe-core (injected from .cache/test-assets/, where book/fetch_assets.py puts it); every
image with alt text that says what it shows. On the first chapter, the kernel-free slider of
matplotlib's to_jshtml animation changes the frame shown; on every chapter, that player
works from the keyboard and names its controls.

Build first (scripts/build_book.sh), then: pytest tests/test_site.py
"""

import functools
import os
import http.server
import re
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
AXE = ROOT / ".cache" / "test-assets" / "axe-core" / "axe.min.js"  # book/fetch_assets.py fetches it


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

    def axe_violations(self) -> list[dict]:
        """axe-core's violations of its default rules (WCAG 2.0-2.2 A and AA, best practices), once.

        Most of axe's time here goes to color-contrast on highlighted code: a chapter has 5,000 to
        10,000 code tokens but only about 7 distinct pairs of text style and background among them.
        One token of each pair is checked for contrast and the others, which would give the same
        ratio, are marked data-axe-same-contrast and left out of that one rule (about a third less
        time); every other rule, and color-contrast on all other text, sees every element.
        """
        if not hasattr(self, "_axe"):
            assert AXE.is_file(), f"{AXE} is missing: run python book/fetch_assets.py (scripts/build_book.sh does)"
            self.page.add_script_tag(path=str(AXE))
            self._axe = self.page.evaluate("""async () => {
                const seen = new Set(), bg = el => getComputedStyle(el).backgroundColor;
                for (const token of document.querySelectorAll("div.highlight pre span")) {
                    const s = getComputedStyle(token), pre = token.closest("pre");
                    const key = [s.color, s.fontSize, s.fontWeight, s.opacity, bg(token), bg(token.parentElement),
                                 bg(pre), bg(pre.parentElement)].join("|");
                    if (seen.has(key)) token.setAttribute("data-axe-same-contrast", "");
                    seen.add(key);
                }
                axe.configure({rules: [{id: "color-contrast", selector: "*:not([data-axe-same-contrast])"}]});
                const result = await axe.run(document, {resultTypes: ["violations"]});
                return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                    targets: v.nodes.map(n => n.target.join(" "))}));
            }""")
        return self._axe


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


@pytest.mark.parametrize("page", PAGES)
def test_no_serious_accessibility_violation(visit, page):
    found = [v for v in visit(page).axe_violations() if v["impact"] in ("serious", "critical")]
    assert not found, f"{page}: axe-core found\n" + "\n".join(
        f"  {v['impact']} {v['id']} ({v['help']}): {len(v['targets'])} elements, e.g. {v['targets'][:3]}"
        for v in found)


# a file name, a path or a hash (myst-nb names images by their sha256) is not a description
NOT_A_DESCRIPTION = re.compile(r"\.(png|jpe?g|gif|svg|webp)\b|_images/|[0-9a-f]{16}", re.IGNORECASE)


def undescribed_images(page) -> list[str]:
    """Every <img> of the page's text (as drawn, widgets and players included) whose alt says nothing.

    The theme's icons outside the text (the Colab logo of the launch menu) are named by axe's rules.
    """
    images = page.eval_on_selector_all(
        "article.bd-article img", "els => els.map(e => [e.getAttribute('alt'), e.outerHTML.slice(0, 100)])")
    return [f"{html} (alt={alt!r})" for alt, html in images
            if alt is None or len(alt.split()) < 5 or NOT_A_DESCRIPTION.search(alt)]


@pytest.mark.parametrize("page", PAGES)
def test_every_image_says_what_it_shows(visit, page):
    bad = undescribed_images(visit(page).page)
    assert not bad, f"{page}: images without a description:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", [p for p in PAGES if p.startswith("notebooks/")])
def test_frame_player_works_from_the_keyboard_and_names_itself(visit, page):
    tab = visit(page).page
    players = tab.locator("div.animation")
    if players.count() == 0:
        pytest.skip(f"{page} has no frame player")
    for k in range(players.count()):
        player = players.nth(k)
        assert player.get_attribute("role") == "group" and player.get_attribute("aria-label")
        for name in ("First frame", "Previous frame", "Play", "Pause", "Next frame", "Last frame"):
            assert player.get_by_role("button", name=name, exact=True).count() == 1, f"{page}: no button {name!r}"
        slider = player.get_by_role("slider", name="Frame", exact=True)  # labelled, so found by its name
        assert slider.count() == 1, f"{page}: the player's slider has no accessible name"
        image = player.locator("img").first
        tab.wait_for_function("s => Number(s.max) > 0", arg=slider.element_handle())
        n = int(slider.get_attribute("max")) + 1
        assert len(image.get_attribute("alt").split()) > 10, f"{page}: the frame's alt says little"
        slider.focus()
        tab.keyboard.press("Home")  # the native range input: Home goes to the first frame ...
        first = image.evaluate("img => img.src")
        assert f"Frame 1 of {n}" in image.get_attribute("alt")
        tab.keyboard.press("ArrowRight")  # ... and the arrow keys step through the frames
        assert image.evaluate("img => img.src") != first, f"{page}: the arrow key did not change the frame"
        assert f"Frame 2 of {n}" in image.get_attribute("alt"), image.get_attribute("alt")
        assert slider.get_attribute("aria-valuetext").startswith(f"Frame 2 of {n}")
        player.get_by_role("button", name="Previous frame", exact=True).focus()
        tab.keyboard.press("Enter")  # a focused button, pressed from the keyboard
        assert image.evaluate("img => img.src") == first and f"Frame 1 of {n}" in image.get_attribute("alt")
