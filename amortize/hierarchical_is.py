"""Hierarchical importance weights: a verdict and a correction in the dimensions where errors live.

The joint weight ``p(y, z) / q(z | y)`` over every latent degenerates with the number of groups even
when q is good (its log variance adds up over groups). The guide factorizes as
``q(globals | y) x prod_g q(z_g | parents, y)``, and so do the weights:

* hold the globals (and the latents of the levels above ``L``) at the first
  :data:`PARENT_DRAWS_FOR_K` of S draws of q (fewer where groups are many: :func:`parent_draws`), draw
  the latents of ``L`` and below M times each; per group g of ``L`` the subtree weight
  ``log w_g = log p(y_g, z_g, z_desc | parents) - log q(z_g, z_desc | parents, y)`` (descendants drawn
  once per draw: an unbiased estimate of their evidence) gives a per-group Pareto k (PSIS over the M
  draws of each group, the median over the parent draws);
* ``log p_hat(y_g | globals) = logmeanexp_m log w_g`` over :data:`WEIGHT_DRAWS` draws of the outermost
  groups given each of the S global draws weighs the globals:
  ``log p(globals) + sum_g log p_hat(y_g | globals) - log q(globals | y)``, a pseudo-marginal weight in
  the globals' dimension whose Pareto k judges (and whose PSIS corrects) q of the globals. An unbiased
  p_hat needs no more draws than keep the weights' noise low (it is measured, and the draws raised
  where it is not), while a per-group k needs a tail of draws: hence two sizes.

Densities come from the Pyro traces of one guide call (``compute_log_prob``: masks and scales as in
:mod:`amortize.objectives`); each site's log density keeps its plate dim, rows map to their innermost
group through the data's index and groups to their parents through the parent index, all vectorized
over groups (no loop over groups).

Example:
    >>> hw = hierarchical_weights(part, num_globals=200, group_draws=32)  # doctest: +SKIP
    >>> hw.global_k, hw.levels["group"].k_p90  # doctest: +SKIP
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.poutine.messenger import Messenger

from .batch import CHUNK_ELEMENTS
from .data import HierarchicalData
from .errors import ModelStructureError
from .importance import K_THRESHOLD, pareto_k_columns

__all__ = [
    "GROUP_DRAWS",
    "WEIGHT_DRAWS",
    "MAX_GROUP_DRAWS",
    "NOISE_SD_TARGET",
    "PARENT_DRAWS_FOR_K",
    "K_COLUMNS",
    "parent_draws",
    "LevelK",
    "HierarchicalWeights",
    "group_log_weights",
    "hierarchical_weights",
    "group_chunk",
    "held_call",
]

GROUP_DRAWS = 32  # M: draws per group given its parents (a PSIS tail of 7; per-group k is the median over parents)
WEIGHT_DRAWS = 4  # draws per outermost group behind the globals' weights, before their noise decides on more
# (on 400-700 groups the noise sd was 0.09 with 8, 0.12 with 4, against a target of 0.5: 8 doubled the pass)
MAX_GROUP_DRAWS = 256  # the most draws per group the globals' pass is rerun with to tame its noise
NOISE_SD_TARGET = 0.5  # sd of the globals' log weights from the per-group estimates that the pass aims below
PARENT_DRAWS_FOR_K = 25  # per-group k from at most this many parent draws (its median is stable by then)
K_COLUMNS = 2500  # per-group k's a level's quantile rests on: fewer parent draws (at least 5) where groups are many
GROUP_QUANTILE = 0.9  # the per-group k quantile that decides (the worst of thousands of groups grows by chance)


@dataclass
class LevelK:
    """Per-group Pareto k of one level, per dataset: ``k [B, G]``, its worst and p90 ``[B]``, the sites."""

    sites: list[str]
    k: torch.Tensor
    k_worst: list[float]
    k_p90: list[float]


@dataclass
class HierarchicalWeights:
    """What :func:`hierarchical_weights` computed for B datasets sharing one structure.

    Attributes:
        global_log_weights: ``[S, B]`` pseudo-marginal log weights of the S held global draws.
        globals_draws: ``{site: [S, B, ...]}`` the held draws (user layout), every latent site.
        levels: per level with latent sites, its :class:`LevelK`.
        num_draws: model evaluations spent (draws x passes).
        group_draws: draws per group behind the globals' weights (raised where their noise was high).
        noise_sd: ``[B]`` median over the global draws of the sd of their log weights' noise
            (delta method, ignoring the common noise's correlation: an upper bound).
    """

    global_log_weights: torch.Tensor
    globals_draws: dict[str, torch.Tensor]
    levels: dict[str, LevelK] = field(default_factory=dict)
    num_draws: int = 0
    group_draws: int = GROUP_DRAWS
    noise_sd: torch.Tensor | None = None


class _CommonNoise(Messenger):
    """Draw every group site of a held call from shared noise: the M draws given each of the S held global
    draws use the same standard normals (common random numbers), so that the noise of
    ``sum_g log p_hat(y_g | globals)`` (sd ~ sqrt(G / M), which alone would degenerate the globals' weights
    with thousands of groups) is nearly the same for every global draw and cancels in their normalized
    weights (the correlated pseudo-marginal of Deligiannidis, Doucet and Pitt 2018). Each draw is still an
    exact draw of q given its globals. A q that is not Gaussian on its unconstrained scale draws as usual."""

    def __init__(self, S: int, M: int, noise: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.S, self.M, self.noise = S, M, noise

    def _pyro_sample(self, msg: Any) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or msg["value"] is not None or not isinstance(fn, dist.TorchDistribution):
            return
        transforms: list[Any] = []
        base = fn
        if isinstance(base, dist.TransformedDistribution):
            transforms, base = list(base.transforms), base.base_dist
        shape = base.batch_shape + base.event_shape
        while isinstance(base, (dist.Independent, ExpandedDistribution)):
            base = base.base_dist
        if not isinstance(base, (dist.Normal, dist.MultivariateNormal)) or shape[0] != self.S * self.M:
            return
        name = msg["name"]
        if name not in self.noise or self.noise[name].shape[1:] != shape[1:]:
            self.noise[name] = torch.randn(self.M, *shape[1:], dtype=base.loc.dtype, device=base.loc.device)
        eps = self.noise[name].repeat(self.S, *[1] * (len(shape) - 1))  # [S * M, ...]: the same M for every s
        if isinstance(base, dist.Normal):
            u = base.loc + base.scale * eps
        else:
            u = base.loc + (base.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
        for t in transforms:
            u = t(u)
        msg["value"] = u


def _site_home(site: dict[str, Any], data: HierarchicalData) -> tuple[str | None, int | None]:
    """``(home, dim)``: the level whose plate holds the site (``"obs"`` for a row plate), None for a global."""
    frames = [f for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
    level_frames = [f for f in frames if f.name in data.levels]
    rows = [f for f in frames if f.name not in data.levels and f.size == data.n_obs and not f.name.startswith("_")]
    if rows:
        return "obs", rows[0].dim
    if level_frames:
        inner = max(level_frames, key=lambda f: data.levels.index(f.name))
        return inner.name, inner.dim
    return None, None


def group_log_weights(
    model_trace: Any, guide_trace: Any, data: HierarchicalData, nesting: int, D: int, B: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``log p - log q`` of one guide call split by home: ``([D, B] globals, {level: [D, B, G_level]})``,
    each level's entry its own sites plus the rows of an innermost group (not yet the children).

    Args:
        model_trace, guide_trace: the traces of the call (``compute_log_prob`` is applied here).
        data: the data the model ran on.
        nesting: the model's ``max_plate_nesting`` (sites carry ``[D, B]`` left of it).
        D, B: draws and datasets of the call.
    """
    dev = data.group.device
    glob = torch.zeros(D, B, dtype=torch.float64, device=dev)
    per = {lvl: torch.zeros(D, B, data.size(lvl), dtype=torch.float64, device=dev) for lvl in data.levels}
    inner = data.levels[-1]
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            lp = torch.as_tensor(site["log_prob"]).double()
            lp = lp.reshape(*[1] * (nesting + 2 - lp.dim()), *lp.shape)  # [D?, B?, *plates]
            home, dim = _site_home(site, data)
            keep = [0, 1] + ([] if home is None else [nesting + 2 + dim])
            drop = tuple(i for i in range(lp.dim()) if i not in keep)
            lp = lp.sum(drop) if drop else lp
            if home is None:
                glob += sign * lp.expand(D, B)
            elif home == "obs":
                per[inner].index_add_(-1, data.index(inner).to(lp.device), sign * lp.expand(D, B, data.n_obs))
            else:
                per[home] += sign * lp.expand(D, B, data.size(home))
    return glob, per


def _subtree(per: dict[str, torch.Tensor], data: HierarchicalData) -> dict[str, torch.Tensor]:
    """Each group's own terms plus its descendants' (bottom-up sums through the parent index)."""
    out: dict[str, torch.Tensor] = {}
    below: torch.Tensor | None = None
    for i in range(len(data.levels) - 1, -1, -1):
        lvl = data.levels[i]
        w = per[lvl] if below is None else per[lvl] + below
        out[lvl] = w
        if i > 0:
            above = data.levels[i - 1]
            below = torch.zeros(*w.shape[:-1], data.size(above), dtype=w.dtype, device=w.device)
            below.index_add_(-1, data.parent_index(lvl).to(w.device), w)
    return out


def held_call(
    part: Any, held: dict[str, torch.Tensor], M: int, encoded: Any, noise: dict[str, torch.Tensor] | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """One guide call holding ``held`` (user layout ``[S, B, ...]``) M times each, drawing the rest (from
    the common ``noise`` of :class:`_CommonNoise` when given): ``((glob, subtree) log weights with
    D = S x M, the drawn values in user layout [S, M, B, ...])``."""
    guide, st, data = part.guide, part.structure, part.data
    S = next(iter(held.values())).shape[0]
    B = data.batch_size or 1
    truth = {k: st.from_user(st[k], v.repeat_interleave(M, 0)) for k, v in held.items()}
    # no argument checks: the held draws were checked finite where they were drawn, and the checks
    # (NaN and support scans of every row's parameters) cost as much as the densities
    with pyro.validation_enabled(False), _CommonNoise(S, M, noise) if noise is not None else nullcontext():
        values = guide(data, S * M, truth, encoded)
    model_trace, guide_trace = guide.get_traces()
    glob, per = group_log_weights(model_trace, guide_trace, data, st.max_plate_nesting, S * M, B)
    drawn = {}
    for s in st.latents:
        v = st.to_user(s, values[s.name])
        drawn[s.name] = v.reshape(S, M, *v.shape[1:])
    return (glob.reshape(S, M, B), {k: v.reshape(S, M, B, -1) for k, v in _subtree(per, data).items()}), drawn


def group_chunk(part: Any, M: int) -> int:
    d = part.data
    width = (d.batch_size or 1) * (d.n_obs + sum(d.sizes.values()))
    return max(1, int(CHUNK_ELEMENTS // max(1, M * width)))


def parent_draws(groups: int) -> int:
    """Parent draws behind the per-group k's of ``groups`` groups: :data:`PARENT_DRAWS_FOR_K` up to 100
    groups, then about :data:`K_COLUMNS` k's in all, at least 5 per group (a level's p90 over hundreds of
    groups is stable with fewer per group, and the pass costs draws x groups)."""
    return max(5, min(PARENT_DRAWS_FOR_K, math.ceil(K_COLUMNS / max(1, int(groups)))))


def _level_k(w: torch.Tensor) -> torch.Tensor:
    """Per-group k ``[B, G]`` from subtree log weights ``[S, M, B, G]``: PSIS k over the M draws given
    each parent draw, then the median over them."""
    S, M, B, G = w.shape
    k = pareto_k_columns(w.permute(1, 0, 2, 3).reshape(M, -1)).reshape(S, B, G)
    return torch.from_numpy(np.nanmedian(np.where(np.isinf(k), np.nan, k), axis=0) if S > 1 else k[0])


def _level_summary(sites: list[str], k: torch.Tensor) -> LevelK:
    worst = [float(np.nanmax(r)) if np.isfinite(r).any() else float("nan") for r in k.numpy()]
    p90 = [float(np.nanquantile(r, GROUP_QUANTILE)) if np.isfinite(r).any() else float("nan") for r in k.numpy()]
    return LevelK(sites, k, worst, p90)


def _pass(
    part: Any, held: dict[str, torch.Tensor], names: tuple[str, ...], M: int, encoded: Any, globals_pass: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """One pass holding the sites ``names`` of ``held`` (S draws), M draws of the rest given each:
    ``(globals' log weights [S, B], their noise sd [S, B], None)`` in the globals' pass, ``(None, None,
    subtree log weights {level: [S, M, B, G]})`` in a pass for the per-group k's."""
    data = part.data
    S = next(iter(held.values())).shape[0]
    chunk = group_chunk(part, M)
    glob_w, noise_sd, trees = [], [], []
    noise: dict[str, torch.Tensor] = {}  # common noise across the chunks of the globals' pass
    for start in range(0, S, chunk):
        sub = {k: held[k][start : start + chunk] for k in names}
        (glob, tree), _ = held_call(part, sub, M, encoded, noise if globals_pass else None)
        if globals_pass:
            outer = tree[data.levels[0]]  # [s, M, B, G0]
            lse = torch.logsumexp(outer, 1)
            glob_w.append(glob[:, 0] + (lse - math.log(M)).sum(-1))
            # delta method: Var log p_hat_g = (E w^2 / (E w)^2 - 1) / M, summed over the groups
            rel = (torch.logsumexp(2 * outer, 1) + math.log(M) - 2 * lse).exp() - 1.0
            noise_sd.append((rel.clamp_min(0) / M).sum(-1).sqrt())
        else:
            trees.append(tree)
    if not globals_pass:
        return None, None, {lvl: torch.cat([t[lvl] for t in trees]) for lvl in trees[0]}
    return torch.cat(glob_w), torch.cat(noise_sd), None


@torch.no_grad()
def hierarchical_weights(
    part: Any,
    num_globals: int,
    group_draws: int = GROUP_DRAWS,
    weight_draws: int = WEIGHT_DRAWS,
    encoded: dict[str, Any] | None = None,
) -> HierarchicalWeights:
    """The globals' pseudo-marginal log weights and every latent level's per-group k (module docstring)
    for one :class:`~amortize.batch.StructureBatch`, on torch's RNG as it is (the caller seeds): the k's
    from ``group_draws`` draws per group given each of the first :func:`parent_draws` parent draws
    (:data:`PARENT_DRAWS_FOR_K` up to 100 groups), the weights from ``weight_draws`` per outermost group
    given each global draw. Where the noise of the globals' log weights (delta method) exceeds
    :data:`NOISE_SD_TARGET`, their pass is run again with more draws per group (up to
    :data:`MAX_GROUP_DRAWS`), unless a level already fails on every dataset (:func:`_decided`).
    ``encoded``: the part's encoding where the caller has it."""
    st, data = part.structure, part.data
    latent_levels = [lvl for lvl in data.levels if st.sites_at(lvl)]
    M, M_w = (int(group_draws), int(weight_draws)) if latent_levels else (1, 1)
    S = int(num_globals)
    encoded = part.encode() if encoded is None else encoded
    held, _ = part.draws(S, encoded=encoded)  # every latent, user layout [S, B, ...]
    glob_sites = tuple(s.name for s in st.global_sites)
    if not glob_sites:
        raise ModelStructureError("hierarchical weights: the model has no global latent site to hold")
    passes: dict[tuple[str, ...], list[str]] = {}
    for lvl in latent_levels:
        above = glob_sites + tuple(s.name for s in st.latents if s.level in data.levels[: data.levels.index(lvl)])
        passes.setdefault(above, []).append(lvl)
    out = HierarchicalWeights(torch.zeros(0), dict(held), group_draws=M_w)
    for names, lvls in passes.items():  # the per-group k's
        n = parent_draws(sum(data.size(lvl) for lvl in lvls))
        _, _, trees = _pass(part, {k: v[:n] for k, v in held.items()}, names, M, encoded, False)
        assert trees is not None
        out.num_draws += min(S, n) * M
        for lvl in lvls:
            out.levels[lvl] = _level_summary([s.name for s in st.sites_at(lvl)], _level_k(trees[lvl]))
    lw, sd, _ = _pass(part, held, glob_sites, M_w, encoded, True)  # the globals' weights
    out.num_draws += S * M_w
    noise = float(sd.median(0).values.max())
    if latent_levels and noise > NOISE_SD_TARGET and M_w < MAX_GROUP_DRAWS and not _decided(out.levels):
        more = min(MAX_GROUP_DRAWS, int(math.ceil(M_w * (noise / NOISE_SD_TARGET) ** 2)))
        lw, sd, _ = _pass(part, held, glob_sites, more, encoded, True)
        out.num_draws += S * more
        out.group_draws = more
    out.global_log_weights, out.noise_sd = lw, sd.median(0).values
    return out


def _decided(levels: dict[str, LevelK]) -> bool:
    """Whether a level already fails the verdict on every dataset (p90 per-group k above
    :data:`~amortize.importance.K_THRESHOLD`, or NaN): then more draws per group cannot change the
    decision, and the correction does not apply, so the globals' pass is not rerun."""
    return any(all(not (p <= K_THRESHOLD) for p in lk.k_p90) for lk in levels.values())
