"""Figures of an amortized posterior against a reference (NUTS draws or known means and sds), per site.

Global sites get one panel per element: histograms of the amortized and the reference draws on
shared bins (or the reference's normal density when only its mean and sd are known). Group-level
sites get two scatter panels over the groups: posterior means and posterior sds, amortized against
the reference, with the identity line. :func:`to_rgb` renders a figure to an ``[H, W, 3]`` array
(what ``SummaryWriter.add_image(..., dataformats="HWC")`` takes); :func:`write_tensorboard` does both;
:func:`save_png` writes a figure to a file.

matplotlib is optional (``pip install 'amortize[arviz]'``): it is imported on first use, never
through ``pyplot`` (no GUI backend, no global figure registry; figures render with Agg).

Example:
    >>> figs = marginal_figures(post.sample(1000), nuts.samples, {"mu": None, "theta": "group"})  # doctest: +SKIP
    >>> write_tensorboard("runs/x/tb", figs, step=3000, prefix="validate/")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import ReferenceMoments, to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "available",
    "new_figure",
    "marginal_figures",
    "global_figure",
    "group_figure",
    "to_rgb",
    "save_png",
    "write_tensorboard",
]

AMORTIZED, REFERENCE = "tab:blue", "tab:orange"
MAX_PANELS = 12  # elements of one global site drawn (a site with more shows its first 12)


def available() -> bool:
    """Whether matplotlib can be imported (figures are skipped without it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(width: float, height: float) -> Figure:
    """An empty Agg figure of ``width`` x ``height`` inches, constrained layout (no pyplot, no GUI backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("figures need matplotlib: pip install 'amortize[arviz]'") from e
    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def _index_name(idx: tuple[int, ...]) -> str:
    return f"[{','.join(map(str, idx))}]" if idx else ""


def global_figure(
    site: str, draws: Any, reference: Any = None, ref_sd: Any = None, label: str = "NUTS", bins: int = 40
) -> Figure:
    """Histograms of a global site's amortized draws against the reference, one panel per element.

    Args:
        site: the site name (panel titles).
        draws: amortized draws ``[n, *event]``.
        reference: reference draws ``[m, *event]``; or, with ``ref_sd``, the reference mean ``[*event]``.
        ref_sd: reference sd ``[*event]``: the reference is then drawn as a normal density.
        label: legend name of the reference.
        bins: histogram bins (shared by both histograms).

    Returns:
        A matplotlib ``Figure``.
    """
    q = to_numpy(draws)
    shape = q.shape[1:]
    q = q.reshape(q.shape[0], -1)  # [n, K]
    moments = ref_sd is not None
    r = None if reference is None else to_numpy(reference)
    if r is not None and not moments:
        r = r.reshape(r.shape[0], -1)  # [m, K]
    elif r is not None:
        r, s = r.reshape(-1), to_numpy(ref_sd).reshape(-1)  # [K] each
    elems = list(np.ndindex(*shape))[:MAX_PANELS]
    cols = min(4, len(elems))
    rows = math.ceil(len(elems) / cols)
    fig = new_figure(3.0 * cols, 2.4 * rows)
    for k, idx in enumerate(elems):
        ax = fig.add_subplot(rows, cols, k + 1)
        x = q[:, k]
        pool = [x]
        if r is not None:
            pool.append(np.array([r[k] - 3 * s[k], r[k] + 3 * s[k]]) if moments else r[:, k])
        lo, hi = np.quantile(np.concatenate(pool), [0.002, 0.998])
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        ax.hist(x, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color=AMORTIZED, label="amortized")
        title = f"{site}{_index_name(idx)}"
        if r is not None:
            if moments:
                grid = np.linspace(lo, hi, 200)
                pdf = np.exp(-0.5 * ((grid - r[k]) / s[k]) ** 2) / (s[k] * math.sqrt(2 * math.pi))
                ax.plot(grid, pdf, color=REFERENCE, lw=1.5, label=label)
                m_ref, s_ref = r[k], s[k]
            else:
                ax.hist(r[:, k], bins=edges, density=True, histtype="step", lw=1.5, color=REFERENCE, label=label)
                m_ref, s_ref = r[:, k].mean(), r[:, k].std(ddof=1)
            if s_ref > 0:
                title += f": z {abs(x.mean() - m_ref) / s_ref:.2f}, sd ratio {x.std(ddof=1) / s_ref:.2f}"
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
        if k == 0:
            ax.legend(fontsize=7, frameon=False)
    return fig


def group_figure(
    site: str,
    draws: Any,
    reference: Any = None,
    ref_sd: Any = None,
    level: str = "group",
    label: str = "NUTS",
    labels: Sequence[Any] | None = None,
) -> Figure:
    """Posterior means (with 90% intervals) and sds of a group-level site over its groups: amortized (y)
    against the reference (x).

    Args:
        site: the site name.
        draws: amortized draws ``[n, G, *event]``.
        reference: reference draws ``[m, G, *event]``; or, with ``ref_sd``, the reference mean ``[G, *event]``.
        ref_sd: reference sd ``[G, *event]``.
        level: the plate level (axis titles).
        label: name of the reference.
        labels: group labels; the group with the largest mean error (in reference sds) is annotated.

    Returns:
        A matplotlib ``Figure``.
    """
    q = to_numpy(draws)
    q = q.reshape(q.shape[0], -1)  # [n, G*E]
    qm, qs = q.mean(0), q.std(0, ddof=1)
    if reference is None:
        raise ValueError(f"group_figure: site '{site}' needs a reference")
    if ref_sd is not None:
        rm, rs = to_numpy(reference).reshape(-1), to_numpy(ref_sd).reshape(-1)
    else:
        r = to_numpy(reference)
        r = r.reshape(r.shape[0], -1)  # [m, G*E]
        rm, rs = r.mean(0), r.std(0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z, ratio = np.abs(qm - rm) / rs, qs / rs  # [G*E] each; NaN or inf where the reference sd is 0
    fig = new_figure(6.4, 3.0)
    q_lo, q_hi = np.quantile(q, [0.05, 0.95], axis=0)  # [G*E] each: the amortized 90% intervals
    for k, (what, a, b) in enumerate((("mean", rm, qm), ("sd", rs, qs))):
        ax = fig.add_subplot(1, 2, k + 1)
        if what == "mean":  # intervals: amortized 90% (vertical), reference mean +- 1.645 sd (horizontal)
            ax.errorbar(a, b, yerr=[b - q_lo, q_hi - b], xerr=1.645 * rs, fmt="none", ecolor="0.75", lw=0.6)
        ax.scatter(a, b, s=10, alpha=0.7, color=AMORTIZED, lw=0)
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8)
        ax.set_xlabel(f"{label} posterior {what}", fontsize=8)
        ax.set_ylabel(f"amortized posterior {what}", fontsize=8)
        ax.tick_params(labelsize=7)
        if what == "mean" and labels is not None and len(labels) == len(a) and np.isfinite(z).any():
            j = int(np.nanargmax(np.where(np.isfinite(z), z, np.nan)))  # the worst group, named
            ax.annotate(str(labels[j]), (a[j], b[j]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    zf, rf = z[np.isfinite(z)], ratio[np.isfinite(ratio)]
    stats = f"z median {np.median(zf):.2f}, p90 {np.quantile(zf, 0.9):.2f}" if zf.size else "z n/a"
    stats += f"; sd ratio median {np.median(rf):.2f}" if rf.size else ""
    fig.suptitle(f"{site} ({len(rm)} x {level}): {stats}", fontsize=9)
    return fig


def marginal_figures(
    draws: Mapping[str, Any],
    reference: Mapping[str, Any] | ReferenceMoments,
    levels: Mapping[str, str | None],
    labels: Mapping[str, Sequence[Any]] | None = None,
    label: str = "NUTS",
) -> dict[str, Figure]:
    """One figure per site present in both ``draws`` and ``reference``.

    Args:
        draws: site -> amortized draws ``[n, *site_shape]`` (one dataset).
        reference: site -> reference draws ``[m, *site_shape]``, or :class:`ReferenceMoments`.
        levels: site -> plate level (None for a global site).
        labels: level -> group labels (annotations).
        label: name of the reference in legends and axis titles.

    Returns:
        site -> ``Figure``, in the order of ``draws``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    moments = isinstance(reference, ReferenceMoments)
    ref_sites = reference.mean if moments else reference
    out = {}
    for site, d in draws.items():
        if site not in ref_sites:
            continue
        ref = ref_sites[site]
        sd = reference.sd[site] if moments else None
        level = levels.get(site)
        if level is None:
            out[site] = global_figure(site, d, ref, sd, label=label)
        else:
            out[site] = group_figure(site, d, ref, sd, level=level, label=label, labels=(labels or {}).get(level))
    return out


def to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure with Agg: ``uint8 [H, W, 3]``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a figure as a PNG file atomically (a reader sees the old file or the new one); returns the path."""
    from ..checkpoint import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()))
    return Path(path)


def write_tensorboard(
    log_dir: str | os.PathLike,
    figures: Mapping[str, Figure | np.ndarray],
    step: int = 0,
    prefix: str = "",
    scalars: Mapping[str, float] | None = None,
) -> list[str]:
    """Add figures (or ``[H, W, 3]`` images) and scalars to a TensorBoard run folder.

    Args:
        log_dir: the TensorBoard folder (a run's ``tb/``); a new events file is added next to
            training's.
        figures: tag -> figure or image; each is written under ``prefix + tag``.
        step: the global step (use the training step the figures describe).
        prefix: prepended to every tag, e.g. ``"validate/"``.
        scalars: tag -> value, written under ``prefix + tag`` (non-finite values are skipped).

    Returns:
        The image tags written.
    """
    from torch.utils.tensorboard import SummaryWriter

    tags = []
    writer = SummaryWriter(os.fspath(log_dir))
    try:
        for tag, fig in figures.items():
            img = fig if isinstance(fig, np.ndarray) else to_rgb(fig)
            writer.add_image(prefix + tag, img, step, dataformats="HWC")
            tags.append(prefix + tag)
        for tag, value in (scalars or {}).items():
            if value is not None and math.isfinite(value):
                writer.add_scalar(prefix + tag, value, step)
    finally:
        writer.close()
    return tags
