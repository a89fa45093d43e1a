"""Read a Pyro model's structure from one traced run: latent sites, their level, support, shapes.

The model is written for ONE dataset with one ``pyro.plate`` per level, named after the level.
amortize runs it for many datasets and posterior draws at once by wrapping it in two outer plates
(:func:`batched`), to the left of every plate the model uses; a model that gathers parents with
``theta[..., data.index(level)]`` works unchanged under them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import Transform

from .data import HierarchicalData
from .errors import ModelStructureError

__all__ = [
    "LatentSite",
    "ModelStructure",
    "trace_structure",
    "batched",
    "priors_free_of_rows",
    "drawing_data",
    "seeded",
    "DRAWS",
    "DATASETS",
]

DRAWS = "_amortize_draws"  # outer plate over posterior draws / particles
DATASETS = "_amortize_datasets"  # plate over datasets that share one structure


@dataclass
class LatentSite:
    """One latent sample site of the model.

    Attributes:
        name: the site name.
        level: the data level whose plate holds it; None for a global site.
        event_shape: shape of one value (per group for a level site).
        support: the distribution's support; ``transform`` maps R^d onto it.
        unconstrained_shape: event shape on the unconstrained scale.
    """

    name: str
    level: str | None
    event_shape: torch.Size
    support: Any
    transform: Transform
    unconstrained_shape: torch.Size

    @property
    def dim(self) -> int:
        """Number of unconstrained coordinates per group (or for the global site)."""
        return int(torch.Size(self.unconstrained_shape).numel())

    def unconstrain(self, value: torch.Tensor) -> torch.Tensor:
        """Map values ``[..., *event_shape]`` to flat unconstrained ``[..., dim]``."""
        u = self.transform.inv(value)
        return u.reshape(*u.shape[: u.dim() - len(self.unconstrained_shape)], self.dim)

    def constrain(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map flat ``[..., dim]`` to ``(value, log|det d value / d u|)`` summed over the event."""
        u = u.reshape(*u.shape[:-1], *self.unconstrained_shape)
        value = self.transform(u)
        ladj = self.transform.log_abs_det_jacobian(u, value)
        if _bounded_at_zero(self.support):  # exp(u) under- or overflows far in q's tails
            info = torch.finfo(value.dtype)
            value = value.clamp(info.tiny, info.max)
        extra = len(self.event_shape) - self.transform.codomain.event_dim
        if extra > 0:
            ladj = ladj.sum(tuple(range(-extra, 0)))
        return value, ladj


def _bounded_at_zero(c: Any) -> bool:
    """A positive or non-negative support (possibly per coordinate of an event)."""
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    bounded = isinstance(c, (constraints._GreaterThan, constraints._GreaterThanEq))
    return bounded and isinstance(c.lower_bound, (int, float)) and float(c.lower_bound) == 0.0


@dataclass
class ModelStructure:
    """Latent sites (in the model's order), the response site and plate nesting of a model."""

    levels: tuple[str, ...]
    latents: list[LatentSite]
    response: str
    max_plate_nesting: int

    @property
    def global_sites(self) -> list[LatentSite]:
        return [s for s in self.latents if s.level is None]

    def sites_at(self, level: str) -> list[LatentSite]:
        return [s for s in self.latents if s.level == level]

    @property
    def global_dim(self) -> int:
        return sum(s.dim for s in self.global_sites)

    def __getitem__(self, name: str) -> LatentSite:
        for s in self.latents:
            if s.name == name:
                return s
        raise KeyError(name)

    def signature(self) -> dict[str, Any]:
        """JSON-able description used to refuse checkpoints of another model."""
        return {
            "levels": list(self.levels),
            "response": self.response,
            "latents": [[s.name, s.level, list(s.event_shape), str(s.support)] for s in self.latents],
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.signature(), sort_keys=True).encode()).hexdigest()[:16]

    def to_user(self, site: LatentSite, value: torch.Tensor) -> torch.Tensor:
        """Reshape a batched value ``[S, B, *plates, *event]`` to ``[S, B, *site_shape]``."""
        S, B = value.shape[:2]
        ev = value.shape[value.dim() - len(site.event_shape) :] if site.event_shape else torch.Size()
        flat = value.reshape(S, B, -1, *ev)
        return flat.squeeze(2) if site.level is None else flat

    def from_user(self, site: LatentSite, value: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_user`: ``[S, B, *site_shape]`` to the batched layout."""
        S, B = value.shape[:2]
        pad = self.max_plate_nesting - (0 if site.level is None else 1)
        rest = value.shape[2:] if site.level is None else value.shape[3:]
        group = () if site.level is None else (value.shape[2],)
        return value.reshape(S, B, *([1] * pad), *group, *rest)


def batched(model: Callable, max_plate_nesting: int) -> Callable:
    """Wrap ``model(data)`` so that ``fn(data, num_draws)`` runs it for B datasets x S draws.

    B is ``data.y.shape[0]`` for a response ``[B, N]`` (1 otherwise). Every site gains two
    leading batch dims ``[S, B]`` left of the model's own plates.
    """

    def run(data: HierarchicalData, num_draws: int = 1, num_datasets: int | None = None) -> Any:
        B = num_datasets or data.batch_size or 1
        with pyro.plate(DRAWS, num_draws, dim=-max_plate_nesting - 2):
            with pyro.plate(DATASETS, B, dim=-max_plate_nesting - 1):
                return model(data)

    return run


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


def trace_structure(model: Callable, data: HierarchicalData) -> ModelStructure:
    """Trace ``model(data)`` once and return its :class:`ModelStructure`.

    Raises:
        ModelStructureError: naming the site or plate the library cannot handle.
    """
    probe = data.with_response(torch.zeros(data.n_obs) if data.y is None else data.y.reshape(-1, data.n_obs)[0])
    try:
        tr = poutine.trace(model).get_trace(probe)
    except Exception as e:  # the model itself failed: say so with the model's own message
        raise ModelStructureError(f"the model failed on the data: {type(e).__name__}: {e}") from e
    latents: list[LatentSite] = []
    observed: list[str] = []
    nesting = 0
    any_plate = False
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        any_plate = any_plate or bool(frames)
        nesting = max([nesting] + [-f.dim for f in frames if f.dim is not None])
        if site["is_observed"]:
            observed.append(name)
            continue
        if (site.get("infer") or {}).get("is_auxiliary"):
            continue
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ModelStructureError(f"site '{name}': discrete latent ({type(fn).__name__}); marginalize it out")
        level_frames = [f for f in frames if f.name in data.levels]
        other = [f.name for f in frames if f.name not in data.levels]
        if other:
            raise ModelStructureError(
                f"site '{name}' is in plate '{other[0]}', which is not a level of the data"
                f" (levels: {list(data.levels)})"
            )
        if len(level_frames) > 1:
            raise ModelStructureError(
                f"site '{name}' is inside plates {[f.name for f in level_frames]}; write one plate per latent and "
                "gather parents with data.index(...) (long format)"
            )
        level = level_frames[0].name if level_frames else None
        if level is not None and level_frames[0].size != data.size(level):
            raise ModelStructureError(
                f"site '{name}': plate '{level}' has size {level_frames[0].size},"
                f" the data has {data.size(level)} groups"
            )
        try:
            t = biject_to(fn.support)
        except NotImplementedError:
            raise ModelStructureError(f"site '{name}': no bijection to R^d for support {fn.support}") from None
        event = fn.event_shape
        latents.append(LatentSite(name, level, event, fn.support, t, torch.Size(t.inv.forward_shape(event))))
    if not any_plate:
        raise ModelStructureError(
            "the model has no pyro.plate: write one plate per level, named after the level "
            f"(levels: {list(data.levels)})"
        )
    if not observed:
        raise ModelStructureError("the model observes nothing: pass obs=data.y to the response site")
    if len(observed) > 1:
        raise ModelStructureError(f"the model observes several sites {observed}; amortize supports one response site")
    if not latents:
        raise ModelStructureError("the model has no latent sites")
    structure = ModelStructure(tuple(data.levels), latents, observed[0], max(nesting, 1))
    _check_batch_safe(model, structure, probe)
    return structure


def _check_batch_safe(model: Callable, structure: ModelStructure, data: HierarchicalData) -> None:
    """Run the model for 2 datasets x 3 draws and check every site kept both batch dims."""
    S, B = 3, 2
    y2 = data.y.expand(B, data.n_obs)
    fn = batched(model, structure.max_plate_nesting)
    hint = "gather with theta[..., data.index(level)] and reduce with negative dims so the model is batch-safe"
    try:
        with pyro.validation_enabled(False):
            tr = poutine.trace(fn).get_trace(data.with_response(y2), S)
    except Exception as e:
        raise ModelStructureError(f"the model fails when run for several datasets at once ({e}); {hint}") from e
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        shape = site["fn"].batch_shape
        lead = len(shape) - structure.max_plate_nesting - 2
        if lead < 0 or tuple(shape[lead : lead + 2]) != (S, B):
            raise ModelStructureError(f"site '{name}': batch shape {tuple(shape)} lost the dataset dims; {hint}")


def drawing_data(model: Callable, data: HierarchicalData) -> HierarchicalData:
    """What the model runs on while drawing from the guide: ``data.skeleton()`` (one row per group,
    so a draw costs O(groups), not O(rows)) when :func:`priors_free_of_rows` for this dataset, else ``data``.

    Decided for each dataset (two runs of the model on one dataset of the batch): whether a prior reads
    rows can depend on the dataset (a group prior at the mean of a row covariate sees the same value on
    the skeleton when every group has one row, another value when groups have several), so a decision
    taken on one dataset is not reused for another. :class:`~amortize.Posterior` keeps it for its own data."""
    return data.skeleton() if priors_free_of_rows(model, data) else data


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed torch's generator of ``device`` (and the CPU's) for the body only, restoring the
    caller's RNG state after it; ``seed=None``: the body runs on the caller's RNG as it is.
    Cheaper than ``torch.manual_seed`` (which seeds every backend), so it suits per-call seeds."""
    if seed is None:
        yield
        return
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(int(seed))
        if devices:
            torch.cuda.manual_seed(int(seed))
        yield
