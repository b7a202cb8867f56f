"""Sphinx hooks that fix what an accessibility audit (axe-core, tests/test_site.py) found in
the pages that the toolchain writes. Loaded from _config.yml (sphinx.local_extensions).

1. Widget snapshots get alt text. A figure's alt text lives in its cell's metadata,
   `mystnb: {image: {alt: ...}}`, which myst-nb 1.4 puts on the cell's image outputs. A
   live widget's figure (ipywidgets `interact`) is not such an output: the saved widget
   state holds it, and the ipywidgets HTML manager draws it with no alt. So the same key on
   a widget cell is copied here onto the cell's widget view, as `data-image-alt`, and
   book/_static/widgets_offline.js puts it on the figure once the manager has drawn it.
2. The bibliography's entries become list items. docutils writes the citation list as
   `role="list"` with entries `role="doc-biblioentry"`, a role that DPUB-ARIA 1.1
   deprecates and that is not a list item: screen readers then announce an empty list
   (axe: aria-required-children, aria-deprecated-role, aria-allowed-role).

The theme's own buttons are fixed by template overrides in book/_templates/.
"""

import html
import re

from docutils import nodes

WIDGET_VIEW = '<script type="application/vnd.jupyter.widget-view+json">'
BIBLIOENTRY = re.compile(r'(<div class="citation"[^>]*?) role="doc-biblioentry"')


def alt_on_widget_views(app, doctree):
    for cell in doctree.findall(nodes.container):
        if cell.get("nb_element") != "cell_code":
            continue
        alt = ((cell.get("cell_metadata") or {}).get("mystnb") or {}).get("image", {}).get("alt")
        if not alt:
            continue
        for raw in cell.findall(nodes.raw):
            if raw.astext().startswith(WIDGET_VIEW):
                tagged = raw.astext().replace(
                    WIDGET_VIEW, WIDGET_VIEW[:-1] + f' data-image-alt="{html.escape(alt, quote=True)}">', 1)
                raw.replace_self(nodes.raw(tagged, tagged, format="html", classes=raw.get("classes", [])))


def citations_as_list_items(app, pagename, templatename, context, doctree):
    body = context.get("body")
    if body and "doc-biblioentry" in body:
        context["body"] = BIBLIOENTRY.sub(r'\1 role="listitem"', body)


def setup(app):
    app.connect("doctree-read", alt_on_widget_views)
    app.connect("html-page-context", citations_as_list_items)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
