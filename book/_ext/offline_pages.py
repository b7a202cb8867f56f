"""Sphinx hooks that keep the book's pages offline and their browser consoles clean.

Loaded from _config.yml (sphinx.local_extensions). Three steps:

1. While a page is rendered, drop the Font Awesome 4 stylesheet that matplotlib's
   `FuncAnimation.to_jshtml()` links from a CDN. Nothing is lost: the theme already
   ships Font Awesome 6, whose CSS styles every `fa fa-...` icon of the animation
   controls (play, pause, step, faster, slower).
2. Drop duplicate <script> entries. sphinx-thebe 0.3.1 on Sphinx 7.4 registers its
   inline config twice (filename None and ""), and the second `const THEBE_JS_URL`
   is a SyntaxError in every page's console. (Thebe itself is off; the string it
   declares is a URL only fetched if thebe were launched.)
3. After the build, scan every HTML page for tags that would make the browser fetch
   something from another host (scripts, stylesheets, images, frames, CSS url(...)).
   Each one is a Sphinx warning, so `jupyter-book build -W` fails and names it.
   Plain links (<a href>) are fine: they are only followed when clicked.
"""

import re
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)

# matplotlib/_animation_data.py: <link rel="stylesheet" href="https://.../font-awesome.min.css">
FONT_AWESOME_CDN = re.compile(r'<link\b[^>]*href="(?:https?:)?//[^"]*font-awesome[^"]*"[^>]*>\s*')

EXTERNAL = r'(?:https?:)?//(?!127\.0\.0\.1|localhost)'
LOADS_REMOTE = re.compile(
    r'<(?:script|img|iframe|source|audio|video|embed)\b[^>]*\bsrc=["\']?' + EXTERNAL
    + r'|<link\b(?=[^>]*\brel=["\']?(?:stylesheet|preload|modulepreload|icon|prefetch))'
      r'[^>]*\bhref=["\']?' + EXTERNAL
    + r'|url\(\s*["\']?' + EXTERNAL
    + r'|@import\s+["\']' + EXTERNAL,
    re.IGNORECASE,
)


def drop_cdn_stylesheets(app, pagename, templatename, context, doctree):
    body = context.get("body")
    if body and FONT_AWESOME_CDN.search(body):
        context["body"] = FONT_AWESOME_CDN.sub("", body)


def drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for js in context.get("script_files", []):
        key = (js.filename or "", js.priority, tuple(sorted(js.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def check_no_remote_loads(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    outdir = Path(app.outdir)
    for page in sorted(outdir.rglob("*.html")):
        text = page.read_text(encoding="utf-8", errors="replace")
        for match in LOADS_REMOTE.finditer(text):
            snippet = text[match.start():match.start() + 120].replace("\n", " ")
            logger.warning("%s loads from another host: %s",
                           page.relative_to(outdir), snippet, type="offline_pages")


def setup(app):
    app.connect("html-page-context", drop_cdn_stylesheets)
    # late, so that scripts other extensions add to the page are seen too
    app.connect("html-page-context", drop_duplicate_scripts, priority=900)
    app.connect("build-finished", check_no_remote_loads)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
