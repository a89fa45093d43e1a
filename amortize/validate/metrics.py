"""Per-site agreement of approximate posterior draws with a reference (draws or mean/sd).

Every element of every site gets one row: the mean error in reference sds (``z``), the sd ratio,
the fraction of the reference inside the approximation's central 90% interval (``coverage90``) and,
with reference draws, the 1-Wasserstein distance of the two standardized samples (``w1``).
:func:`summarize` pools the rows per level (global vs each plate level); :func:`format_table`
prints them as a plain aligned table and :func:`to_markdown` as a Markdown table.

Example:
    >>> rows = compare(post.sample(4000), nuts.samples, levels={"mu": None, "theta": "school"})  # doctest: +SKIP
    >>> print(format_table(summarize(rows)))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import DataError

__all__ = [
    "ReferenceMoments",
    "compare",
    "element_name",
    "summarize",
    "format_table",
    "to_markdown",
    "wasserstein1",
    "to_numpy",
    "SUMMARY_COLUMNS",
    "GLOBAL",
]

logger = logging.getLogger(__name__)

GLOBAL = "global"  # the group name of sites outside every plate in summaries
SUMMARY_COLUMNS = (
    "z_median",
    "z_p90",
    "sd_ratio_median",
    "sd_ratio_p10",
    "sd_ratio_p90",
    "coverage90",
    "w1_median",
    "count",
)


@dataclass
class ReferenceMoments:
    """A reference posterior known only by its marginal means and sds (site -> tensor of the site's shape).

    Attributes:
        mean: site -> posterior mean.
        sd: site -> posterior standard deviation.
        mean_mcse: site -> Monte Carlo standard error of the mean, when the source gives it.
    """

    mean: dict[str, torch.Tensor]
    sd: dict[str, torch.Tensor]
    mean_mcse: dict[str, torch.Tensor] = field(default_factory=dict)


def to_numpy(x: Any) -> np.ndarray:
    """A tensor or array-like as a float64 numpy array (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def compare(
    draws: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor] | ReferenceMoments,
    levels: Mapping[str, str | None] | None = None,
    labels: Mapping[str, Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per site and element comparing approximate draws with the reference.

    Args:
        draws: site -> approximate draws ``[n, *shape]``; a group-level site's first dim is its groups.
        reference: site -> reference draws ``[m, *shape]``, or :class:`ReferenceMoments`.
        levels: site -> plate level name (None for a global site); missing sites count as global.
        labels: level -> group labels (``HierarchicalData.labels``); without them a group is its position.

    Returns:
        Rows with keys ``site``, ``level`` (``"global"`` for a global site), ``group`` (the group's
        label; None for a global site), ``element`` (tuple: the index within the site's event shape),
        ``mean`` and ``sd`` of the draws, ``ref_mean`` and ``ref_sd`` of the reference, ``z``
        (|mean - ref_mean| / ref_sd), ``sd_ratio`` (sd / ref_sd), ``coverage90`` (fraction of the
        reference inside the central 90% interval of ``draws``; normal approximation of the reference
        with moments) and ``w1`` (1-Wasserstein distance after standardizing both by the reference
        mean and sd; None with moments). Sites present in only one of ``draws`` and ``reference`` are
        skipped (logged), and so are elements the reference holds constant (sd 0: the fixed entries
        of a correlation factor).

    Raises:
        DataError: no site in common, or a site whose shapes disagree (names the site).
    """
    moments = isinstance(reference, ReferenceMoments)
    ref_sites = reference.mean if moments else reference
    common = [s for s in draws if s in ref_sites]
    if not common:
        raise DataError(f"compare: no site in common between draws {sorted(draws)} and reference {sorted(ref_sites)}")
    skipped = sorted(set(draws).symmetric_difference(ref_sites))
    if skipped:
        logger.info("compare: sites in only one of draws and reference are skipped: %s", ", ".join(skipped))
    rows: list[dict[str, Any]] = []
    for site in common:
        q = to_numpy(draws[site])  # [n, *shape]
        shape = q.shape[1:]
        q = q.reshape(q.shape[0], -1)  # [n, K]
        if moments:
            m_ref = to_numpy(reference.mean[site])
            s_ref = to_numpy(reference.sd[site])
            if m_ref.shape != shape or s_ref.shape != shape:
                raise DataError(
                    f"compare: site '{site}': draws have shape {shape}, reference mean/sd {m_ref.shape}/{s_ref.shape}"
                )
            m_ref, s_ref, r = m_ref.reshape(-1), s_ref.reshape(-1), None
        else:
            r = to_numpy(reference[site])
            if r.shape[1:] != shape:
                raise DataError(f"compare: site '{site}': draws have shape {shape}, reference draws {r.shape[1:]}")
            r = r.reshape(r.shape[0], -1)  # [m, K]
            m_ref, s_ref = r.mean(0), r.std(0, ddof=1)
        m_q, s_q = q.mean(0), q.std(0, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.abs(m_q - m_ref) / s_ref
            ratio = s_q / s_ref
        lo, hi = np.quantile(q, [0.05, 0.95], axis=0)  # [K] each
        if r is None:
            cover = _normal_cdf((hi - m_ref) / s_ref) - _normal_cdf((lo - m_ref) / s_ref)
        else:
            cover = ((r >= lo) & (r <= hi)).mean(0)
        level = (levels or {}).get(site)
        names = (labels or {}).get(level) if level is not None else None
        for k, idx in enumerate(np.ndindex(*shape)):
            if not s_ref[k] > 0:
                continue
            w1 = None
            if r is not None:
                w1 = wasserstein1((q[:, k] - m_ref[k]) / s_ref[k], (r[:, k] - m_ref[k]) / s_ref[k])
            group, element = (None, idx) if level is None else (int(idx[0]), idx[1:])
            if group is not None and names is not None and len(names) == shape[0]:
                group = names[group]
            rows.append(
                {
                    "site": site,
                    "level": level or GLOBAL,
                    "group": group,
                    "element": tuple(int(i) for i in element),
                    "mean": float(m_q[k]),
                    "sd": float(s_q[k]),
                    "ref_mean": float(m_ref[k]),
                    "ref_sd": float(s_ref[k]),
                    "z": float(z[k]),
                    "sd_ratio": float(ratio[k]),
                    "coverage90": float(cover[k]),
                    "w1": w1,
                }
            )
    return rows


def element_name(row: Mapping[str, Any]) -> str:
    """A comparison row's element as one name: ``mu``, ``weight[1]``, ``theta[north]``, ``beta[north,1]``."""
    parts = ([] if row.get("group") is None else [row["group"]]) + list(row.get("element") or ())
    return f"{row['site']}[{','.join(map(str, parts))}]" if parts else str(row["site"])


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.as_tensor(x, dtype=torch.float64)).numpy()


def wasserstein1(u: np.ndarray, v: np.ndarray) -> float:
    """1-Wasserstein distance of two 1-d samples: the area between their empirical CDFs.

    Args:
        u: first sample ``[n]``.
        v: second sample ``[m]``.

    Returns:
        ``W1 = integral |F_u(x) - F_v(x)| dx``.
    """
    u, v = np.sort(np.asarray(u, dtype=np.float64)), np.sort(np.asarray(v, dtype=np.float64))
    if u.size == 0 or v.size == 0 or not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
        return float("nan")
    grid = np.sort(np.concatenate([u, v]))  # [n + m]
    f_u = np.searchsorted(u, grid[:-1], side="right") / u.size
    f_v = np.searchsorted(v, grid[:-1], side="right") / v.size
    return float(np.sum(np.abs(f_u - f_v) * np.diff(grid)))


def summarize(rows: Sequence[Mapping[str, Any]], by: str = "level") -> list[dict[str, Any]]:
    """Pool comparison rows per group: global sites first, then each level in order of appearance.

    Args:
        rows: output of :func:`compare`.
        by: the row key to group on (``"level"`` or ``"site"``); a None level is named ``"global"``.

    Returns:
        One dict per group with ``by`` and :data:`SUMMARY_COLUMNS`: median and 90th percentile of ``z``,
        median, 10th and 90th percentile of ``sd_ratio``, mean ``coverage90``,
        median ``w1`` (None without reference draws) and the number of rows.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        key = row[by] if row[by] is not None else GLOBAL
        groups.setdefault(key, []).append(row)
    order = sorted(groups, key=lambda g: g != GLOBAL)  # stable: global first, then order of appearance
    out = []
    for key in order:
        grp = groups[key]
        z = np.array([r["z"] for r in grp])
        ratio = np.array([r["sd_ratio"] for r in grp])
        w1 = [r["w1"] for r in grp if r.get("w1") is not None]
        out.append(
            {
                by: key,
                "z_median": float(np.median(z)),
                "z_p90": float(np.quantile(z, 0.9)),
                "sd_ratio_median": float(np.median(ratio)),
                "sd_ratio_p10": float(np.quantile(ratio, 0.1)),
                "sd_ratio_p90": float(np.quantile(ratio, 0.9)),
                "coverage90": float(np.mean([r["coverage90"] for r in grp])),
                "w1_median": float(np.median(w1)) if w1 else None,
                "count": len(grp),
            }
        )
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.3f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3g}"
    if isinstance(v, tuple):
        return "[" + ",".join(str(i) for i in v) + "]" if v else ""
    return str(v)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table, text left-aligned and numbers right-aligned (as numpyro's ``print_summary``).

    Args:
        rows: dicts, e.g. from :func:`summarize` or :func:`compare`.
        columns: keys to show, in order; default all keys in order of first appearance.

    Returns:
        The table, one line per row after a header line, without a trailing newline.
    """
    cols = _columns(rows, columns)
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    numeric = [all(isinstance(row.get(c), (int, float, type(None))) for row in rows) for c in cols]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(cols)] + [line(r) for r in cells])


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown (GitHub pipe) table of ``rows``, numbers right-aligned.

    Args:
        rows: dicts, e.g. from :func:`summarize`.
        columns: keys to show, in order; default all keys in order of first appearance.

    Returns:
        The table, without a trailing newline.
    """
    cols = _columns(rows, columns)
    numeric = [all(isinstance(row.get(c), (int, float, type(None))) for row in rows) for c in cols]
    head = "| " + " | ".join(cols) + " |"
    rule = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    body = ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in cols) + " |" for row in rows]
    return "\n".join([head, rule, *body])
