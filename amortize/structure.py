"""Read a Pyro model's structure from one traced run: latent sites, their level, support, shapes.

The model is written for ONE dataset with one ``pyro.plate`` per level, named after the level.
amortize runs it for many datasets and posterior draws at once by wrapping it in two outer plates
(:func:`batched`), to the left of every plate the model uses; a model that gathers parents with
``theta[..., data.index(level)]`` works unchanged under them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import Transform

from .data import HierarchicalData
from .errors import DataError, ModelStructureError
from .model_checks import (
    check_batch_safe,
    check_global_shapes,
    check_plates,
    check_row_plate,
    drawing_data,
    is_deterministic,
    nothing_observed,
    priors_free_of_rows,
    row_plate,
)
from .plates import DATASETS, DRAWS, batched, seeded

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


class _Reading(dict):
    """A level's covariates that note which names are read (``[]``, ``get``, or all by iterating)."""

    def __init__(self, cols: dict[str, torch.Tensor], seen: set[str]) -> None:
        super().__init__(cols)
        self.seen = seen

    def __getitem__(self, name: str) -> torch.Tensor:
        self.seen.add(name)
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:
        if name in self:
            self.seen.add(name)
        return super().get(name, default)

    def values(self) -> Any:
        self.seen.update(self)
        return super().values()

    def items(self) -> Any:
        self.seen.update(self)
        return super().items()


def _base_constraint(c: Any) -> Any:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c


def _static(c: Any) -> bool:
    """A support whose bounds are plain numbers (not tensors read from the data or the latents)."""
    c = _base_constraint(c)
    return not any(isinstance(v, torch.Tensor) for v in vars(c).values())


def _describe_support(c: Any) -> str:
    """A support in words: ``integer >= 0``, ``{0, 1}``, ``real``; tensor bounds are not spelled out."""
    if c is None:
        return ""
    base = _base_constraint(c)
    if not _static(base):
        return f"{type(base).__name__.lstrip('_')} (bounds from the data or latents)"
    names = {
        constraints.boolean: "{0, 1}",
        constraints.real: "real",
        constraints.nonnegative_integer: "integers >= 0",
        constraints.positive_integer: "integers >= 1",
        constraints.positive: "real > 0",
        constraints.nonnegative: "real >= 0",
        constraints.unit_interval: "real in [0, 1]",
    }
    for known, words in names.items():
        if type(base) is type(known) and vars(base) == vars(known):
            return words
    return str(base)


def _family(fn: Any) -> str:
    """The distribution class under masks, ``Independent`` and ``expand``."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


@dataclass
class ModelStructure:
    """Latent sites (in the model's order), the response site and plate nesting of a model.

    Attributes:
        response_family: the response distribution's class (``"Normal"``, ``"Poisson"``; wrappers
            such as ``Independent`` or a mask unwrapped).
        response_support: the response distribution's support (checked by :meth:`check_response`).
        plates: ``(name, dim)`` of every plate the model opens, the observation plate included.
        covariates: ``{level: [names]}`` of the covariates the model reads.
        row_level: the observation plate's name where latent sites live in it (one effect per row):
            then the last of ``levels``, an implicit level whose groups are the rows (see
            :meth:`HierarchicalData.rows_as_level`); None otherwise.
        factors: the data's grouping factors, each a chain of ``levels`` (one chain: nested; several:
            crossed, e.g. persons x items); empty means one chain, ``levels``.
    """

    levels: tuple[str, ...]
    latents: list[LatentSite]
    response: str
    max_plate_nesting: int
    response_family: str = ""
    response_support: Any = None
    plates: tuple[tuple[str, int], ...] = ()
    covariates: dict[str, list[str]] = field(default_factory=dict)
    row_level: str | None = None
    factors: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        self.factors = tuple(tuple(c) for c in self.factors) or (tuple(self.levels),)

    @property
    def crossed(self) -> bool:
        """Whether the model's levels form several crossed factors rather than one chain."""
        return len(self.factors) > 1

    def complete(self, data: HierarchicalData) -> HierarchicalData:
        """``data`` with the model's levels: the implicit row level added where the model has one."""
        return data.as_levels(self.levels) if self.row_level is not None else data

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
        """JSON-able description used to refuse checkpoints of another model: levels, latent sites
        (name, level, shape, support), the response site with its distribution family and support,
        the plates and the covariates."""
        return {
            "levels": list(self.levels),
            **({"factors": [list(c) for c in self.factors]} if self.crossed else {}),
            "response": self.response,
            "response_family": self.response_family,
            "response_support": _describe_support(self.response_support),
            "plates": [list(p) for p in self.plates],
            "covariates": {lvl: list(names) for lvl, names in sorted(self.covariates.items())},
            "latents": [[s.name, s.level, list(s.event_shape), str(s.support)] for s in self.latents],
        }

    def fingerprint(self) -> str:
        """A short hash of :meth:`signature`."""
        return hashlib.sha256(json.dumps(self.signature(), sort_keys=True).encode()).hexdigest()[:16]

    def check_response(self, data: HierarchicalData) -> None:
        """Refuse a response outside the response site's support (a negative or fractional Poisson
        count, a Bernoulli 0.5), before any network runs.

        A support whose bounds are tensors (read from the data or the latents) is checked for
        integrality only, where it is discrete.

        Raises:
            DataError: naming the column, the first bad rows (and dataset, for ``y [B, N]``) and the support.
        """
        if data.y is None or self.response_support is None:
            return
        support, y = self.response_support, data.y
        base = _base_constraint(support)
        if _static(support):
            ok = base.check(y)
        elif base.is_discrete:
            ok = y == torch.round(y)
        else:
            return
        ok = ok.expand(y.shape) if ok.shape != y.shape else ok
        if bool(ok.all()):
            return
        bad = torch.nonzero(~ok)
        first = [tuple(int(i) for i in b) for b in bad[:5]]
        where = ", ".join(f"{f'dataset {b[0]} ' if y.dim() == 2 else ''}row {b[-1]} ({float(y[b]):g})" for b in first)
        raise DataError(
            f"response '{data.response}': {len(bad)} value(s) outside the support of site '{self.response}'"
            f" ({self.response_family}: {_describe_support(support)}); first at {where}"
        )

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


def trace_structure(model: Callable, data: HierarchicalData) -> ModelStructure:
    """Trace ``model(data)`` once and return its :class:`ModelStructure`.

    Raises:
        ModelStructureError: naming the site or plate the library cannot handle and what is wrong
            with it (a ``pyro.param`` in the model, a response without ``obs=``, a per-group latent
            outside its plate, a model that mixes datasets, ...).
    """
    probe = data.with_response(torch.zeros(data.n_obs) if data.y is None else data.y.reshape(-1, data.n_obs)[0])
    read: dict[str, set[str]] = {}
    probe.covariates = {lvl: _Reading(cols, read.setdefault(lvl, set())) for lvl, cols in data.covariates.items()}
    try:
        tr = poutine.trace(model).get_trace(probe)
    except Exception as e:  # the model itself failed: say so with the model's own message
        cause = e.__cause__ if type(e.__cause__) is type(e) else e  # without the trace-shapes dump Pyro appends
        raise ModelStructureError(f"the model failed on the data: {type(cause).__name__}: {cause}") from e
    params = [name for name, site in tr.nodes.items() if site["type"] == "param"]
    if params:
        raise ModelStructureError(
            f"the model calls pyro.param({params[0]!r}): amortize trains the guide only, so a parameter inside"
            " the model is never learned; make it a latent (pyro.sample with a prior) or a constant"
        )
    sites = [
        (name, site)
        for name, site in tr.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site) and not is_deterministic(site)
    ]
    observed = [name for name, site in sites if site["is_observed"]]
    if not observed:
        raise ModelStructureError(nothing_observed(sites, data))
    if len(observed) > 1:
        raise ModelStructureError(f"the model observes several sites {observed}; amortize supports one response site")
    row_level = row_plate(sites, observed[0], data)  # latents per row: the rows as an innermost level
    levels_data = data if row_level is None else data.rows_as_level(row_level)
    latents: list[LatentSite] = []
    plates: dict[str, int] = {}
    nesting = 0
    for name, site in sites:
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        plates.update({f.name: f.dim for f in frames if f.dim is not None})
        nesting = max([nesting] + [-f.dim for f in frames if f.dim is not None])
        if site["is_observed"] or (site.get("infer") or {}).get("is_auxiliary"):
            continue
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ModelStructureError(f"site '{name}': discrete latent ({type(fn).__name__}); marginalize it out")
        check_row_plate(name, frames, row_level, observed[0], levels_data)
        check_plates(name, fn, frames, levels_data)
        level_frames = [f for f in frames if f.name in levels_data.levels]
        level = level_frames[0].name if level_frames else None
        try:
            t = biject_to(fn.support)
        except NotImplementedError:
            raise ModelStructureError(f"site '{name}': no bijection to R^d for support {fn.support}") from None
        event = fn.event_shape
        latents.append(LatentSite(name, level, event, fn.support, t, torch.Size(t.inv.forward_shape(event))))
    if not plates:
        raise ModelStructureError(
            "the model has no pyro.plate: write one plate per level, named after the level "
            f"(levels: {list(data.levels)})"
        )
    if not latents:
        raise ModelStructureError("the model has no latent sites")
    fn = tr.nodes[observed[0]]["fn"]
    structure = ModelStructure(
        tuple(levels_data.levels),
        latents,
        observed[0],
        max(nesting, 1),
        response_family=_family(fn),
        response_support=fn.support,
        plates=tuple(sorted(plates.items())),
        covariates={lvl: sorted(names) for lvl, names in sorted(read.items()) if names},
        row_level=row_level,
        factors=levels_data.factors,
    )
    check_global_shapes(model, structure, data.with_response(probe.y))
    check_batch_safe(model, structure, probe)
    return structure
