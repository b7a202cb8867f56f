"""Figure helpers shared by the chapter notebooks.

Two needs that every chapter has, kept here so that notebooks import them instead of
copying them:

- figures cheap enough for chapters that must execute within a CPU time budget (fixed
  margins instead of a tight bounding box, plain-number log labels instead of maths text);
- a kernel-free slider for the web book: `frame_player` precomputes a few frames and returns
  the HTML of matplotlib's `FuncAnimation.to_jshtml` player, which works on a static page.

`import lora_edu` does not import this module, and so never imports matplotlib; notebooks do
`from lora_edu.teaching.plots import ...`.
"""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.animation import FuncAnimation
from matplotlib.backends.backend_agg import FigureCanvasAgg
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


def frame_player(fig, draw_frame, n_frames, interval=800, close=True):
    """HTML of a kernel-free player (`FuncAnimation.to_jshtml`) with n_frames frames of `fig`.

    draw_frame(i) puts frame i into `fig` and returns the artists it changed. Drawing text is
    the slow part of a small figure, and the axes, ticks and labels are the same in every
    frame, so they are drawn once; each frame redraws on top of them only the changed artists
    ("blitting"). The player then just shows the finished pictures. `fig` is closed unless
    close=False, e.g. when a live widget draws into it as well.
    """
    if not hasattr(fig.canvas, "copy_from_bbox"):  # a closed figure that was shown may have lost its Agg canvas
        FigureCanvasAgg(fig)  # (attaches itself to fig)
    changed = draw_frame(0)
    for artist in changed:
        artist.set_animated(True)  # left out of the full drawing: these change in every frame
    fig.canvas.draw()
    background = fig.canvas.copy_from_bbox(fig.bbox)
    pictures = []
    for i in range(n_frames):
        fig.canvas.restore_region(background)
        for artist in draw_frame(i):
            fig.draw_artist(artist)
        pictures.append(np.array(fig.canvas.buffer_rgba()))  # [height, width, 4]
    for artist in changed:
        artist.set_animated(False)  # drawn normally again, should fig be shown later
    if close:
        plt.close(fig)  # its pictures are taken; the figure itself is not shown

    screen = plt.figure(figsize=fig.get_size_inches(), dpi=fig.dpi)  # the same pixels, one picture at a time
    shown = screen.figimage(pictures[0])
    plt.close(screen)
    anim = FuncAnimation(screen, lambda i: shown.set_data(pictures[i]), frames=n_frames, interval=interval)
    return anim.to_jshtml(default_mode="once")
