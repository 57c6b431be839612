"""Result files: atomic JSON, the NIAH heatmap (the paper's figure), and line plots.

Every file is written to a temporary name in the same directory and renamed into place, so a run
killed mid-write never leaves a truncated results.json or PNG that looks finished.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable, Optional, Sequence


def _atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call write(tmp_path), then rename tmp_path to `path`; returns `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str, obj: Any) -> str:
    """Write `obj` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    return _atomic_write(path, write)


def format_length(n: int) -> str:
    """Axis label for a token count: 8192 -> "8K", 1048576 -> "1M", anything else verbatim."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def save_heatmap(
    path: str,
    scores: Sequence[Sequence[float]],
    lengths: Sequence[int],
    depths: Sequence[float],
    title: str,
    trained_length: Optional[int] = None,
) -> str:
    """NIAH heatmap like the paper's figure: x = context length, y = needle depth (0% at the top),
    colour = score in [0, 1] from red (0) to green (1). scores[i][j] is depth i, length j.

    trained_length: the model's trained (original) context length, drawn as a dashed vertical line
    where it falls on the (categorical, ascending) length axis, interpolated in log length between
    neighbouring columns; nothing is drawn when it lies outside the plotted lengths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters or CI
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    if len(scores) != len(depths) or any(len(row) != len(lengths) for row in scores):
        raise ValueError(f"scores must be [len(depths)={len(depths)}][len(lengths)={len(lengths)}]")
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(lengths) + 3), max(4.0, 0.35 * len(depths) + 2)))
    im = ax.imshow(scores, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths], rotation=45, ha="right")
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Needle depth")
    ax.set_title(title)
    # Grid lines between cells, as in the paper's figure.
    ax.set_xticks([x - 0.5 for x in range(1, len(lengths))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(depths))], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    x = trained_length_x(lengths, trained_length)
    if x is not None:
        ax.axvline(x, color="black", linestyle="--", linewidth=1.5,
                   label=f"trained length {format_length(int(trained_length))}")
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.25), frameon=False, fontsize=8)
    fig.colorbar(im, ax=ax, label="Score")
    fig.tight_layout()
    try:
        return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def trained_length_x(lengths: Sequence[int], trained_length: Optional[int]) -> Optional[float]:
    """x coordinate of trained_length on a heatmap whose column j is lengths[j] (ascending): a column
    centre when it is one of the lengths, else log-interpolated between the two neighbouring columns
    (a cell edge is half a column away). None when outside [lengths[0], lengths[-1]] or not given."""
    if trained_length is None or not lengths:
        return None
    xs = sorted(lengths)
    if xs != list(lengths) or not xs[0] <= trained_length <= xs[-1]:
        return None
    for j in range(len(xs) - 1):
        lo, hi = xs[j], xs[j + 1]
        if lo <= trained_length <= hi:
            return j + (math.log(trained_length) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return 0.0  # a single length equal to trained_length


def save_line_plot(
    path: str,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    ylim: Optional[tuple[float, float]] = None,
) -> str:
    """One line per series name: {name: (xs, ys)}; PNG written atomically. ylim fixes the y-axis
    (e.g. (0, 100) for percent scores, so a flat 90% does not look like a cliff)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    try:
        return _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
