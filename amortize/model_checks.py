"""Trace-time checks of a user's model: each names the site and says what is wrong with it.

Used by :func:`amortize.structure.trace_structure`: latents in the right plates, no batch dim outside
a plate, a response that is observed, and a model that is batch-safe (runs for many datasets and
draws at once without mixing them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .data import HierarchicalData
from .errors import ModelStructureError
from .plates import batched, seeded

if TYPE_CHECKING:
    from .structure import ModelStructure

__all__ = [
    "is_deterministic",
    "nothing_observed",
    "check_plates",
    "check_batch_safe",
    "check_global_shapes",
    "row_plate",
    "check_row_plate",
]


def is_deterministic(site: dict[str, Any]) -> bool:
    """A ``pyro.deterministic`` site: a record of a value, neither a latent nor a response."""
    return bool((site.get("infer") or {}).get("_deterministic"))


def nothing_observed(sites: list[tuple[str, dict[str, Any]]], data: HierarchicalData) -> str:
    """Why no site is observed: a sampled site over the rows is the response without ``obs=``."""
    for name, site in sites:
        rows = [f for f in site["cond_indep_stack"] if f.vectorized and f.size == data.n_obs]
        if rows and not any(f.name in data.levels for f in site["cond_indep_stack"]):
            return (
                f"the model observes nothing: site '{name}' (in plate '{rows[0].name}' over the {data.n_obs} rows)"
                f" is sampled, not observed; pass obs=data.y to it"
            )
    return "the model observes nothing: pass obs=data.y to the response site"


def check_plates(name: str, fn: Any, frames: list[Any], data: HierarchicalData) -> None:
    """A latent lives in at most one plate, a level's, of that level's size; no batch dim outside a plate."""
    other = [f.name for f in frames if f.name not in data.levels]
    if other:
        raise ModelStructureError(
            f"site '{name}' is in plate '{other[0]}', which is not a level of the data"
            f" (levels: {list(data.levels)}); a latent lives at one level or is global"
        )
    level_frames = [f for f in frames if f.name in data.levels]
    chains = {lvl: k for k, chain in enumerate(data.factors) for lvl in chain}
    if len({chains[f.name] for f in level_frames}) > 1:
        raise ModelStructureError(
            f"site '{name}' is inside the plates {[f.name for f in level_frames]} of crossed factors: an"
            " interaction effect (one value per pair of groups) is not supported; give each factor its own"
            " latents and add them per row"
        )
    if len(level_frames) > 1:
        raise ModelStructureError(
            f"site '{name}' is inside plates {[f.name for f in level_frames]}; write one plate per latent and "
            "gather parents with data.index(...) (long format)"
        )
    if level_frames and level_frames[0].size != data.size(level_frames[0].name):
        lvl = level_frames[0].name
        raise ModelStructureError(
            f"site '{name}': plate '{lvl}' has size {level_frames[0].size}, the data has {data.size(lvl)} groups"
        )
    dims = {f.dim for f in frames}
    shape = tuple(fn.batch_shape)
    for i, n in enumerate(shape):
        dim = i - len(shape)
        if n > 1 and dim not in dims:
            sizes = [lvl for lvl in data.levels if data.size(lvl) == n]
            per = f"; if it holds one value per '{sizes[0]}' group, sample it inside pyro.plate('{sizes[0]}', ...)"
            raise ModelStructureError(
                f"site '{name}' has {n} values along batch dim {dim} outside any plate{per if sizes else ''};"
                " a vector-valued latent needs .to_event(1)"
            )


def check_batch_safe(model: Callable, structure: ModelStructure, data: HierarchicalData) -> None:
    """Run the model for 2 datasets x 3 draws: every site keeps both batch dims, and the first
    dataset's densities do not move when only the other datasets' latents change (a model that
    mixes datasets: ``float(mu.mean())``, ``.item()``, a reduction over every dim)."""
    S, B = 3, 2  # unequal, so that a dim taken for the other shows
    y2 = data.y.expand(B, data.n_obs)
    fn = batched(model, structure.max_plate_nesting)
    hint = "gather with theta[..., data.index(level)] and reduce with negative dims so the model is batch-safe"
    batch_data = data.with_response(y2)
    try:
        with pyro.validation_enabled(False), seeded(0):
            tr = poutine.trace(fn).get_trace(batch_data, S)
            other = poutine.trace(fn).get_trace(batch_data, S)
    except Exception as e:
        raise ModelStructureError(f"the model fails when run for several datasets at once ({e}); {hint}") from e
    sites = {
        name: site
        for name, site in tr.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site) and not is_deterministic(site)
    }
    for name, site in sites.items():
        shape = site["fn"].batch_shape
        lead = len(shape) - structure.max_plate_nesting - 2
        if lead < 0 or tuple(shape[lead : lead + 2]) != (S, B):
            raise ModelStructureError(f"site '{name}': batch shape {tuple(shape)} lost the dataset dims; {hint}")
    # the first draw of the first dataset keeps its latents; every other (draw, dataset) gets other values
    values = {}
    for name, site in sites.items():
        if site["is_observed"] or name not in other.nodes:
            continue
        v, w = site["value"], other.nodes[name]["value"]
        lead = v.dim() - structure.max_plate_nesting - 2 - len(site["fn"].event_shape)
        keep = torch.zeros(v.shape[lead : lead + 2], dtype=torch.bool, device=v.device)
        keep[0, 0] = True
        values[name] = torch.where(keep.reshape(*keep.shape, *[1] * (v.dim() - lead - 2)), v, w)
    try:
        with pyro.validation_enabled(False), seeded(1):
            moved = poutine.trace(poutine.condition(fn, data=values)).get_trace(batch_data, S)
    except Exception as e:
        raise ModelStructureError(f"the model fails when run for several datasets at once ({e}); {hint}") from e
    for name, site in tr.nodes.items():  # plates that subsample drew other indices: nothing to compare
        if (
            site_is_subsample(site)
            and name in moved.nodes
            and not torch.equal(site["value"], moved.nodes[name]["value"])
        ):
            return
    for name, site in sites.items():
        if name not in moved.nodes:
            continue
        first = _first_log_prob(site, structure)
        again = _first_log_prob(moved.nodes[name], structure)
        if first.shape != again.shape or not torch.allclose(first, again, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise ModelStructureError(
                f"site '{name}': the first dataset's density changed when only the other datasets' latents"
                " changed, so the model mixes datasets (float(...) or .item() of a latent, or a reduction over"
                f" every dim such as mu.mean()); {hint}"
            )


def _first_log_prob(site: dict[str, Any], structure: ModelStructure) -> torch.Tensor:
    """The log density of the first draw of the first dataset at ``site`` (all its plates)."""
    with torch.no_grad():
        lp = site["fn"].log_prob(site["value"])
    lead = lp.dim() - structure.max_plate_nesting - 2
    return lp[(slice(None),) * max(lead, 0) + (0, 0)]


def check_global_shapes(model: Callable, structure: ModelStructure, data: HierarchicalData) -> None:
    """A global latent's shape must not follow the number of groups: run the model on the data
    twice over (every level's groups doubled) and compare (a per-group latent written as
    ``Normal(mu, 1).expand([G]).to_event(1)`` outside its plate changes; a real vector does not)."""
    if data.y is None:
        return
    try:
        twice = _doubled(data)
        with pyro.validation_enabled(False), seeded(0):
            tr = poutine.trace(model).get_trace(twice)
    except Exception:  # noqa: BLE001 - a model that needs this exact data: nothing to compare
        return
    for site in structure.global_sites:
        node = tr.nodes.get(site.name)
        if node is None or node["type"] != "sample":
            continue
        shape = tuple(node["fn"].batch_shape + node["fn"].event_shape)
        if shape != tuple(site.event_shape):
            per = [lvl for lvl in data.levels if data.size(lvl) in site.event_shape]
            where = f"pyro.plate('{per[0]}', ...)" if per else "the plate of its level"
            raise ModelStructureError(
                f"site '{site.name}' has shape {tuple(site.event_shape)} on the data and {shape} on data with"
                f" twice the groups, but it is in no plate: a latent with one value per group must be sampled"
                f" inside {where}"
            )


def _doubled(data: HierarchicalData) -> HierarchicalData:
    """The dataset twice over: every level's groups, the rows and the response repeated once."""
    parents = {
        lvl: torch.cat([data.parents[lvl], data.parents[lvl] + data.size(above)])
        for chain in data.factors
        for above, lvl in zip(chain[:-1], chain[1:])
    }
    rows = {lvl: torch.cat([idx, idx + data.size(lvl)]) for lvl, idx in data.row_index.items()}
    cov = {lvl: {k: torch.cat([v, v]) for k, v in dict(cols).items()} for lvl, cols in data.covariates.items()}
    return HierarchicalData(
        data.levels,
        parents,
        rows if data.crossed else rows[data.factors[0][-1]],
        y=torch.cat([data.y, data.y], -1),
        covariates=cov,
        response=data.response,
        dtype=data.y.dtype,
        factors=data.factors,
    )


def row_plate(sites: list[tuple[str, dict[str, Any]]], response: str, data: HierarchicalData) -> str | None:
    """The observation plate's name where a latent site lives in it (one value per row), else None.

    The observation plate is the response site's plate over the N rows that is not a level; a latent
    inside it is a group latent of an implicit innermost level whose groups are the rows.
    """
    node = dict(sites)[response]
    rows = [
        f.name
        for f in node["cond_indep_stack"]
        if f.vectorized and f.size == data.n_obs and f.name not in data.levels and f.dim is not None
    ]
    if len(rows) != 1:
        return None
    for _, site in sites:
        if site["is_observed"] or (site.get("infer") or {}).get("is_auxiliary"):
            continue
        if any(f.name == rows[0] for f in site["cond_indep_stack"] if f.vectorized):
            return rows[0]
    return None


def check_row_plate(name: str, frames: list[Any], row_level: str | None, response: str, data: HierarchicalData) -> None:
    """A latent in a plate over the rows that is not the response's (observation) plate is refused."""
    for f in frames:
        if f.size == data.n_obs and f.name not in data.levels:
            where = (
                f"the observation plate '{row_level}'" if row_level else f"the plate of the response site '{response}'"
            )
            raise ModelStructureError(
                f"site '{name}' is in plate '{f.name}' over the {data.n_obs} rows, which is not the plate of the"
                f" response site '{response}': a latent with one value per row must be sampled in {where}"
            )


def priors_free_of_rows(model: Callable, data: HierarchicalData) -> bool:
    """Whether the model's latent sites see the same priors on ``data.skeleton()`` as on ``data``.

    Drawing from the guide needs the model only for the conditional priors of its latent sites; on
    the skeleton (one row per group) the likelihood line costs G instead of N per draw. Checked on
    this dataset by running the model on both under one seed: the latent values agree exactly when
    no prior reads row data (a model that computes group values from rows, e.g. group means of a row
    covariate, gets False and is run on the full data).
    """
    probe = data if data.y is None or data.y.dim() == 1 else data.with_response(data.y[0])

    def latents(d: HierarchicalData) -> dict[str, torch.Tensor]:
        with seeded(0, d.y.device if d.y is not None else None), pyro.validation_enabled(False):
            tr = poutine.trace(model).get_trace(d)
        return {
            name: site["value"]
            for name, site in tr.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        }

    skeleton = probe.skeleton()
    try:
        full, rows = latents(probe), latents(skeleton)
    except Exception:  # the model needs its rows (it failed on one per group): run it on the data
        return False
    return full.keys() == rows.keys() and all(
        full[k].shape == rows[k].shape and torch.equal(full[k], rows[k]) for k in full
    )


def drawing_data(model: Callable, data: HierarchicalData) -> HierarchicalData:
    """What the model runs on while drawing from the guide: ``data.skeleton()`` (one row per group,
    so a draw costs O(groups), not O(rows)) when :func:`priors_free_of_rows` for this dataset, else ``data``.

    Decided for each dataset (two runs of the model on one dataset of the batch): whether a prior reads
    rows can depend on the dataset (a group prior at the mean of a row covariate sees the same value on
    the skeleton when every group has one row, another value when groups have several), so a decision
    taken on one dataset is not reused for another. :class:`~amortize.Posterior` keeps it for its own data."""
    return data.skeleton() if priors_free_of_rows(model, data) else data
