"""PREFIX.lengths.png: the token-weighted document-length histogram, source vs output.

matplotlib's first figure in a process costs ~0.5 s of CPU (its imports, the font list, the
mathtext parser the log axis's labels need, the PNG encoder): a fifth of a 20 MB build. So a build
draws it in a `HistogramPainter`, a child process forked when the build starts, which pays that
while the main process proves the tokenizer and loads it, and draws the figure when the main
process sends it the histograms at the end (~0.1 s). (A thread would not do: matplotlib's imports
hold the GIL, which the main process needs to take its workers' answers off their pipes.)
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Optional, Sequence

import numpy as np

from megatron_ultralong.data.preprocess.forking import child_signals, forking_without_handlers
from megatron_ultralong.data.preprocess.stats import HIST_EDGES, LengthStats


def warm_up_plotting() -> None:
    """Do once what `plot_length_histogram` pays for on its first figure (~0.5 s of CPU: the
    imports, the font list, the mathtext parser its log-axis labels need, the PNG encoder), so a
    caller can do it while other work runs instead of at the end of a build."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1), dpi=20)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_xscale("log")
    ax.set_xlim(1, 1000)
    fig.savefig(io.BytesIO(), format="png")


def plot_length_histogram(
    before: LengthStats, after: LengthStats, png_path: str, title: str, thresholds: Sequence[int] = ()
) -> None:
    """Token-weighted document-length histogram, source vs output, log-x (matplotlib Agg); dashed
    lines mark the short/long thresholds, labelled in the legend and at the top of each line."""
    # A bare Figure on the Agg canvas: pyplot's import and backend selection cost ~0.7 s of the
    # builder's fixed start-up and touch global state a library should leave alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    centers = np.sqrt(np.concatenate([[1], HIST_EDGES]) * np.concatenate([HIST_EDGES, [HIST_EDGES[-1] * 2]]))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for stats, label in ((before, "source"), (after, "output (after upsampling)")):
        total = max(1, int(stats.hist_tokens.sum()))
        ax.step(centers, stats.hist_tokens / total, where="mid", label=label)
    for t, (name, color), top in zip(thresholds, (("short threshold", "tab:red"),
                                                  ("long threshold", "tab:green")), (0.98, 0.86)):
        ax.axvline(t, color=color, linestyle="--", linewidth=0.9, label=f"{name} ({t:,} tokens)")
        # Staggered heights: thresholds 2x apart (4K/8K) are closer on the log axis than a label.
        ax.text(t, top, f" {name}\n {t:,}", transform=ax.get_xaxis_transform(), color=color,
                fontsize=8, va="top", ha="left")
    nonzero = np.nonzero(before.hist_tokens + after.hist_tokens)[0]
    if len(nonzero):
        ax.set_xlim(centers[nonzero[0]] / 2, centers[nonzero[-1]] * 2)
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.12, top=0.92)  # tight_layout: 0.4 s
    fig.savefig(png_path, format="png")


def _painter_main(conn) -> None:
    child_signals()
    warm_up_plotting()
    job = conn.recv()
    if job is None:
        return
    try:
        plot_length_histogram(*job)
        conn.send(None)
    except Exception as e:  # handed to the parent, which raises it with the file's name
        conn.send(f"{type(e).__name__}: {e}")


class HistogramPainter:
    """`plot_length_histogram` in a child process started now (module docstring); in this process
    where fork is unavailable. Use as a context manager; `paint` at most once."""

    def __init__(self):
        self.proc: Optional[mp.process.BaseProcess] = None
        if "fork" in mp.get_all_start_methods():
            ctx = mp.get_context("fork")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_painter_main, args=(child,), daemon=True,
                                    name="lengths-png")
            with forking_without_handlers():
                self.proc.start()
            child.close()

    def paint(self, before: LengthStats, after: LengthStats, png_path: str, title: str,
              thresholds: Sequence[int] = ()) -> None:
        """Draw and write the PNG; returns once the file is written."""
        if self.proc is None:
            plot_length_histogram(before, after, png_path, title, thresholds)
            return
        try:
            self.conn.send((before, after, png_path, title, tuple(thresholds)))
            error = self.conn.recv()
        except (EOFError, OSError):
            error = f"the drawing process ended (exit code {self.proc.exitcode})"
        if error is not None:
            raise RuntimeError(f"{png_path}: could not draw the length histogram ({error})")

    def __enter__(self) -> "HistogramPainter":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.terminate()
            self.proc.join()
            self.conn.close()
