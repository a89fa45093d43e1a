"""Posterior SBC conditional on the data (Säilynoja, Schmitt, Bürkner, Vehtari 2025): local calibration of q.

SBC over the prior asks whether q is calibrated on average over datasets; the verdict needs it for
*this* dataset y. Posterior SBC checks that by the self-consistency of Bayesian updating:

1. draw R joint parameter sets ``theta_r ~ q(. | y)`` (globals and every group latent);
2. simulate replicate responses ``y_r ~ p(. | theta_r)`` for replicate rows: copies of some of y's
   own rows (their groups and covariates; :func:`replicate_rows`);
3. the augmented dataset ``(y, y_r)`` (y's rows, then the replicate rows) has the posterior
   ``p(theta | y, y_r)``, of which ``theta_r`` is one draw when ``q(. | y)`` is the posterior; so the
   rank of ``theta_r`` among L draws of ``q(. | y, y_r)`` is uniform on ``0..L`` when q is calibrated
   at y and at the augmented datasets (which share one structure: one ``[R, N + M]`` batch, one call).

The augmentation is what makes the ranks uniform: ranked among ``q(. | y_r)`` alone, ``theta_r`` would
not be (the prior's shrinkage counts twice), even for the exact posterior. A bias that is the same at y
and at the augmented data (a constant shift of q) cancels and is not seen; a q too narrow or too wide,
or whose error changes as data accrue, is; SBC over the prior and the importance weights see the rest.

Rows: each innermost group gets up to as many replicate rows as it has, no more than the training
range of rows per group allows (``ranges["obs"]``), so the augmented data stay where q was trained; a
dataset with no room (a fixed design trained at its size) is skipped with a reason.

Quantities, each with one rank per replicate so that the R ranks are independent (replicates are
independent given y): every coordinate of every global site; per group site and coordinate,
``site (one group)``, the value of one group per replicate, the groups taken in a seeded rotation
(each group about R / G times), and ``site (group mean)``, the mean over the level's groups. Pooling
all groups' ranks of a replicate would give R x G ranks, but they are dependent (groups share the
globals' draw), which makes binomial bands too narrow (as in :mod:`amortize.validate.sbc`).

Each quantity's R ranks are tested against the simultaneous ECDF band (:mod:`amortize.ecdf`) at level
``1 - alpha / m`` for m quantities (Bonferroni): a calibrated q passes every quantity with probability
at least ``1 - alpha``.

The verdict reports it and does not decide on it: at R = 200 the band fails shifts of 0.2 q sds, and
an amortized q's error at the augmented datasets (up to twice the rows per group) is not its error at
y; on held-out datasets it failed 11 of 12 posteriors that agree with NUTS within 0.3 sd, and its
shifts on those (0.2-1.5 sd) overlap those of the wrong ones (experiments/bench/verdict.py). Its ranks
are uniform for an exact posterior (tests/test_local_sbc.py): a lead to follow where the k's pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batch import CHUNK_ELEMENTS, StructureBatch
from .data import OBS, HierarchicalData
from .ecdf import ECDFBand, ecdf_band, ecdf_test, ranks_of
from .errors import AmortizeError
from .plates import seeded

__all__ = ["LocalSBC", "local_sbc", "local_sbc_reasons", "probit_shift", "replicate_rows", "augmented", "skipped"]

ONE, MEAN = "one group", "group mean"


@dataclass(frozen=True)
class LocalSBC:
    """Settings of the local (posterior) SBC of the verdict.

    Attributes:
        replicates: R, replicate datasets (ranks per quantity).
        draws: L, draws of q per augmented dataset (ranks lie in ``0..L``).
        alpha: family-wise error level over the quantities of one dataset.
        simulations: null ECDFs behind the band's adjusted level (at least ``20 m / alpha``).
        within_range: replicate rows only up to the trained rows per group (False: every group's rows
            doubled, also beyond the training range: more power, on data q may not have seen).
    """

    replicates: int = 200
    draws: int = 49
    alpha: float = 0.01
    simulations: int = 5000
    within_range: bool = True

    def __post_init__(self) -> None:
        if self.replicates < 2 or self.draws < 1 or not 0 < self.alpha < 1:
            raise ValueError(
                f"LocalSBC: need replicates >= 2, draws >= 1, 0 < alpha < 1; got {self.replicates}, {self.draws},"
                f" {self.alpha}"
            )


def replicate_rows(data: HierarchicalData, ranges: dict[str, Any] | None, rng: np.random.Generator) -> torch.Tensor:
    """Indices ``[M]`` of the rows of ``data`` to replicate: per innermost group, as many as it has rows,
    at most the training range's rows per group (``ranges["obs"]``; None: no limit) minus its own,
    chosen at random."""
    group = data.group.cpu().numpy()  # [N] innermost group of each row
    n = np.bincount(group, minlength=data.size(data.levels[-1]))  # [G]
    hi = ranges.get("obs", [None, math.inf])[1] if ranges else math.inf
    room = np.clip(np.minimum(n, hi - n), 0, None).astype(np.int64)  # [G] replicate rows per group
    order = rng.permutation(group.size)
    order = order[np.argsort(group[order], kind="stable")]  # rows grouped, random within each group
    start = np.concatenate([[0], np.cumsum(n)[:-1]])  # [G] first position of each group in ``order``
    pos = np.arange(group.size) - start[group[order]]  # position within the group
    keep = np.sort(order[pos < room[group[order]]])
    return torch.as_tensor(keep, dtype=torch.long, device=data.group.device)


def augmented(data: HierarchicalData, rows: torch.Tensor, y: torch.Tensor) -> HierarchicalData:
    """``data``'s structure with copies of ``rows`` appended (same groups and covariates) and the
    response ``y [B, N + M]`` (y's own rows, then the replicate rows)."""
    parents = {lvl: data.parents[lvl] for lvl in data.levels[1:]}
    cov = {
        lvl: ({k: torch.cat([v, v[rows]]) for k, v in cols.items()} if lvl == OBS else dict(cols))
        for lvl, cols in data.covariates.items()
    }
    group = torch.cat([data.group, data.group[rows]])
    labels = data.labels or None
    return HierarchicalData(data.levels, parents, group, y, cov, labels, data.response, dtype=y.dtype)


def _quantity(site: str, elem: tuple[int, ...], functional: str | None) -> str:
    name = site + (f"[{','.join(map(str, elem))}]" if elem else "")
    return name if functional is None else f"{name} ({functional})"


@torch.no_grad()
def _ranks(part: StructureBatch, settings: LocalSBC, rows: torch.Tensor, rng: np.random.Generator) -> dict:
    """``{quantity: (site, level, functional, ranks [R, B])}`` for the B datasets of ``part``, on
    torch's RNG as it is (the caller seeds)."""
    st, data = part.structure, part.data
    R, L, B, N = settings.replicates, settings.draws, part.batch_size or 1, data.n_obs
    theta = part.draws(R)[0]  # {site: [R, B, *shape]} from q(. | y)
    y_rep = part.predictive(theta)[..., rows]  # [R, B, M]
    y0 = data.y.reshape(1, B, N).expand(R, B, N)
    y_aug = torch.cat([y0, y_rep], -1).reshape(R * B, N + rows.numel())  # [R * B, N + M], replicate-major
    aug = StructureBatch(part.guide, part.model, augmented(data, rows, y_aug), part.device)
    draws = aug.draws(L)[0]  # {site: [L, R * B, *shape]} from q(. | y, y_r)
    out: dict[str, tuple[str, str | None, str, np.ndarray]] = {}
    for s in st.latents:
        d, t, event = draws[s.name], theta[s.name].reshape(R * B, *theta[s.name].shape[2:]), tuple(s.event_shape)
        if s.level is None:
            parts = {None: (d.reshape(L, R * B, -1), t.reshape(R * B, -1))}  # [L, R B, E], [R B, E]
        else:
            G = data.size(s.level)
            d, t = d.reshape(L, R * B, G, -1), t.reshape(R * B, G, -1)  # [L, R B, G, E], [R B, G, E]
            pick = np.resize(rng.permutation(G), R)  # [R] the rotation of groups, one per replicate
            g = torch.as_tensor(np.repeat(pick, B), device=d.device)  # [R B]
            i = torch.arange(R * B, device=d.device)
            parts = {ONE: (d[:, i, g], t[i, g]), MEAN: (d.mean(2), t.mean(1))}
        for functional, (dd, tt) in parts.items():
            r = ranks_of(dd, tt, rng).reshape(R, B, -1)  # [R, B, E]
            for e, elem in enumerate(np.ndindex(*event) if event else [()]):
                out[_quantity(s.name, elem, functional)] = (s.name, s.level, functional or "element", r[:, :, e])
    return out


def _band(settings: LocalSBC, m: int, seed: int) -> ECDFBand:
    alpha_q = settings.alpha / max(1, m)
    sims = max(settings.simulations, math.ceil(20 / alpha_q))
    return ecdf_band(settings.replicates, settings.draws + 1, alpha_q, simulations=sims, seed=seed)


def skipped(why: str, settings: LocalSBC | None = None) -> dict[str, Any]:
    """The local-SBC entry of a dataset it was not run on: ``ok`` None and the reason."""
    s = settings or LocalSBC()
    return {"ok": None, "skipped": why, "reason": why, "replicates": s.replicates, "draws": s.draws, "alpha": s.alpha}


@torch.no_grad()
def local_sbc(
    part: StructureBatch, settings: LocalSBC, ranges: dict[str, Any], seed: int, device: Any = None
) -> list[dict[str, Any]]:
    """Local SBC of each of the B datasets of ``part`` (module docstring), seeded by ``seed`` alone.

    Returns:
        Per dataset: ``ok`` (every quantity inside its band; None when skipped, with ``skipped`` the
        reason), ``quantities`` (per quantity: ``site``, ``level``, ``functional``, ``p_value``,
        ``inside``, ``mean_rank``: ranks / L, 0.5 when calibrated; ``shift``: :func:`probit_shift`),
        ``worst`` (the quantity of the smallest p-value), ``reason`` (:func:`local_sbc_reasons`, or
        "passed"), ``replicates`` R, ``draws`` L, ``alpha``, ``alpha_per_quantity``, ``rows_added`` M.
    """
    B = part.batch_size or 1
    if part.structure.row_level is not None:
        return [skipped("latents per row: a replicate row would carry a latent of its own", settings)] * B
    if part.q_globals is not None:
        why = "q(globals) was fitted on this dataset alone (Subsampled): a replicate dataset would need its own fit"
        return [skipped(why, settings)] * B
    if part.structure.crossed:
        why = "crossed factors: replicate rows would grow every factor's groups past the trained structure"
        return [skipped(why, settings)] * B
    rng = np.random.default_rng([int(seed) % 2**63, 20])
    rows = replicate_rows(part.data, ranges if settings.within_range else None, rng)
    if rows.numel() == 0:
        why = "no room for replicate rows: every group has the most rows per group trained on (within_range=False)"
        return [skipped(why, settings)] * B
    R = settings.replicates
    per_dataset = R * settings.draws * (part.data.n_obs + rows.numel() + sum(part.data.sizes.values()))
    block = max(1, int(5 * CHUNK_ELEMENTS // max(1, per_dataset)))  # datasets per pass: bounds the draws' memory
    found: dict[str, tuple[str, str | None, str, list[np.ndarray]]] = {}
    try:
        with seeded(int(rng.integers(2**62)), device):
            for b0 in range(0, B, block):
                sub = part if B <= block else _sub(part, b0, min(B, b0 + block))
                for q, (site, level, fn, r) in _ranks(sub, settings, rows, rng).items():
                    found.setdefault(q, (site, level, fn, []))[3].append(r)
    except AmortizeError as e:  # non-finite draws of the replicates: q cannot be checked there, nor trusted
        why = f"local SBC: the replicate datasets' draws failed ({e})"
        return [{**skipped(why, settings), "ok": False} for _ in range(B)]
    band = _band(settings, len(found), int(rng.integers(2**31)))
    out = []
    for j in range(B):
        rows_q = {}
        for q, (site, level, fn, rs) in found.items():
            r = np.concatenate(rs, 1)[:, j]  # [R]
            test = ecdf_test(r, band)
            rows_q[q] = {
                "site": site,
                "level": level or "global",
                "functional": fn,
                "p_value": float(test.p_value),
                "inside": bool(test.inside),
                "mean_rank": float(r.mean() / settings.draws),
                "shift": probit_shift(r, settings.draws),
            }
        worst = min(rows_q, key=lambda q: rows_q[q]["p_value"])
        res = {
            "ok": all(v["inside"] for v in rows_q.values()),
            "quantities": rows_q,
            "worst": worst,
            "replicates": R,
            "draws": settings.draws,
            "alpha": settings.alpha,
            "alpha_per_quantity": band.alpha,
            "rows_added": int(rows.numel()),
        }
        out.append({**res, "reason": "; ".join(local_sbc_reasons(res)) or "passed"})
    return out


def probit_shift(ranks: np.ndarray, draws: int) -> float:
    """The mean of ``Phi^-1((rank + 1/2) / (L + 1))`` over the replicates: 0 when calibrated (standard
    error about ``1 / sqrt(R)``); +d when the replicates' parameters lie about d of q's sds above q's
    draws at the augmented data (q moves down as data accrue), -d below. An effect size next to the
    band's p-value, which at R = 200 also flags shifts too small to matter."""
    u = (np.asarray(ranks, dtype=np.float64) + 0.5) / (draws + 1)
    return float(np.mean(_probit(u)))


def _probit(u: np.ndarray) -> np.ndarray:
    return math.sqrt(2.0) * torch.erfinv(torch.as_tensor(2.0 * u - 1.0, dtype=torch.float64)).numpy()


def _sub(part: StructureBatch, b0: int, b1: int) -> StructureBatch:
    """The datasets ``b0:b1`` of a batch, as their own batch (same structure)."""
    return part.like(part.data.with_response(part.data.y[b0:b1]))


def local_sbc_reasons(res: dict[str, Any]) -> list[str]:
    """Why the local SBC says not to trust q for a dataset (empty when it passed or was skipped)."""
    if res.get("ok") is not False:
        return []
    if "quantities" not in res:
        return [res["skipped"]]
    bad = [q for q, v in res["quantities"].items() if not v["inside"]]
    bad.sort(key=lambda q: res["quantities"][q]["p_value"])
    qs = res["quantities"]
    shown = ", ".join(f"'{q}' (p {qs[q]['p_value']:.2g}, shift {qs[q]['shift']:+.2f} sd)" for q in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return [
        f"local SBC: ranks of {shown}{more} outside the {1 - res['alpha_per_quantity']:.2%} band"
        f" ({res['replicates']} replicates x {res['draws']} draws): q is not calibrated near this dataset"
    ]
