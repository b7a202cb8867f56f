"""Figure helpers shared by the chapter notebooks.

Two needs that every chapter has, kept here so that notebooks import them instead of
copying them:

- figures cheap enough for chapters that must execute within a CPU time budget (fixed
  margins instead of a tight bounding box, plain-number log labels instead of maths text);
- a kernel-free slider for the web book: `frame_player` precomputes a few frames and returns
  the HTML of matplotlib's `FuncAnimation.to_jshtml` player, which works on a static page,
  made usable with a screen reader (WCAG 2.1: text alternatives, named controls).

`import lora_edu` does not import this module, and so never imports matplotlib; notebooks do
`from lora_edu.teaching.plots import ...`.
"""

import html
import json
import re

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.animation import FuncAnimation
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, NullLocator

BOOK_RC = {"figure.dpi": 72, "font.size": 9, "axes.titlesize": 9}


def book_style():
    """Small fonts and a low dpi, and in Jupyter no tight-bbox crop when a figure is shown.

    Each figure sets its own margins (`subplots_adjust`), so the inline backend need not draw
    it once more just to measure its labels. Same as `%config InlineBackend.print_figure_kwargs
    = {"bbox_inches": None}` in a cell.
    """
    plt.rcParams.update(BOOK_RC)
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.run_line_magic("config", 'InlineBackend.print_figure_kwargs = {"bbox_inches": None}')


def _plain_log(ax, which, base):
    getattr(ax, f"set_{which}scale")("log", base=base)
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())


def log_y(ax, base=10):
    """Put `ax` on a log y-axis labelled in plain numbers (1e-05, 0.001, 0.1), without minor ticks.

    matplotlib's default labels, 10 with an exponent, go through its maths typesetter, which
    takes longer than drawing the rest of these small figures.
    """
    _plain_log(ax, "y", base)


def log_x(ax, base=10):
    """log_y for the x-axis; base=2 labels ranks as 1, 2, 4, ... 1024."""
    _plain_log(ax, "x", base)


def frame_player(fig, draw_frame, n_frames, interval=800, close=True, alt=None):
    """HTML of a kernel-free player (`FuncAnimation.to_jshtml`) with n_frames frames of `fig`.

    draw_frame(i) puts frame i into `fig` and returns the artists it changed. Drawing text is
    the slow part of a small figure, and the axes, ticks and labels are the same in every
    frame, so they are drawn once; each frame redraws on top of them only the changed artists
    ("blitting"). The player then just shows the finished pictures. `fig` is closed unless
    close=False, e.g. when a live widget draws into it as well.

    alt says in words what the figure shows, for readers who cannot see it; without it, a
    description is made from the axes' labels. The frame's image carries alt plus "Frame i
    of n" and the text that frame changed (its title), and so does the slider's value.
    """
    if not hasattr(fig.canvas, "copy_from_bbox"):  # a closed figure that was shown may have lost its Agg canvas
        FigureCanvasAgg(fig)  # (attaches itself to fig)
    changed = draw_frame(0)
    for artist in changed:
        artist.set_animated(True)  # left out of the full drawing: these change in every frame
    fig.canvas.draw()
    background = fig.canvas.copy_from_bbox(fig.bbox)
    pictures, captions = [], []
    for i in range(n_frames):
        fig.canvas.restore_region(background)
        drawn = draw_frame(i)
        for artist in drawn:
            fig.draw_artist(artist)
        pictures.append(np.array(fig.canvas.buffer_rgba()))  # [height, width, 4]
        texts = [_one_line(a.get_text()) for a in drawn if isinstance(a, Text)]
        words = "; ".join(t for t in texts if t)
        captions.append(f"Frame {i + 1} of {n_frames}" + (f": {words}" if words else ""))  # e.g. its title
    for artist in changed:
        artist.set_animated(False)  # drawn normally again, should fig be shown later
    if alt is None:
        alt = _describe_axes(fig)
    if close:
        plt.close(fig)  # its pictures are taken; the figure itself is not shown

    screen = plt.figure(figsize=fig.get_size_inches(), dpi=fig.dpi)  # the same pixels, one picture at a time
    shown = screen.figimage(pictures[0])
    plt.close(screen)
    anim = FuncAnimation(screen, lambda i: shown.set_data(pictures[i]), frames=n_frames, interval=interval)
    return _accessible(anim.to_jshtml(default_mode="once"), alt, captions)


def _one_line(text):
    return " ".join(text.split())


def _describe_axes(fig):
    """A plain description of fig's panels from their labels: "2 panels: MSE against Adam step; ..."."""
    panels = []
    for ax in fig.axes:
        x, y = _one_line(ax.get_xlabel()), _one_line(ax.get_ylabel())
        if x or y:
            panels.append(f"{y} against {x}" if x and y else x or y)
    if not panels:
        return "An animated figure."
    count = f"{len(panels)} panels" if len(panels) > 1 else "One panel"
    return f"{count}: {'; '.join(panels)}."


def _accessible(player, alt, captions):
    """to_jshtml's player with an accessible name on every control and a text alternative per frame.

    matplotlib 3.11 names the buttons (aria-label) and labels the radio buttons, but leaves the
    frame's <img> without alt and the slider without a label. Both are added here, the player
    becomes a named group, and a small script keeps the image's alt and the slider's
    aria-valuetext on the frame shown, whichever control changed it.
    """
    uid = re.search(r'<img id="_anim_img(\w+)"', player).group(1)  # to_jshtml's random id
    attr = lambda text: html.escape(text, quote=True)
    n = len(captions)
    replacements = {
        '<div class="animation">':
            f'<div class="animation" role="group" aria-label="{attr(f"Frame player, {n} frames")}">',
        f'<img id="_anim_img{uid}">': f'<img id="_anim_img{uid}" alt="{attr(f"{alt} {captions[0]}")}">',
        f'<input id="_anim_slider{uid}" type="range"':  # its value is announced as the frame's caption
            f'<input id="_anim_slider{uid}" type="range" aria-label="Frame"'
            f' aria-valuetext="{attr(captions[0])}"',
    }
    for old, new in replacements.items():
        if player.count(old) != 1:
            raise RuntimeError(f"matplotlib's to_jshtml template changed: {old!r} is not in it once")
        player = player.replace(old, new)
    data = json.dumps({"alt": alt, "captions": captions}).replace("</", "<\\/")  # safe inside <script>
    return player + f"""
<script>
  /* Keep the frame's text alternative on the frame shown (lora_edu.teaching.plots). */
  (function () {{
    var text = {data};
    function wire(tries) {{
      var anim = window["anim{uid}"];
      if (!anim) {{ if (tries > 0) setTimeout(function () {{ wire(tries - 1); }}, 20); return; }}
      var img = document.getElementById("_anim_img{uid}");
      var slider = document.getElementById("_anim_slider{uid}");
      var setFrame = anim.set_frame;
      anim.set_frame = function (frame) {{
        setFrame.call(anim, frame);
        img.alt = text.alt + " " + text.captions[frame];
        slider.setAttribute("aria-valuetext", text.captions[frame]);
      }};
    }}
    setTimeout(function () {{ wire(100); }}, 0);  /* queued after the player's own, which makes anim */
  }})();
</script>
"""
