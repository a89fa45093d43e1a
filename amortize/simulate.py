"""Training data: random dataset structures and prior-predictive simulation from the model.

A :class:`StructureSampler` draws the shape of a dataset (groups per level, observations per
group, covariates); :func:`simulate` runs the user's model on it for a batch of B datasets at once
and returns the latent values and responses.

Example:
    >>> sampler = StructureSampler(["school"], groups={"school": (10, 50)}, obs=(5, 30))
    >>> data = sampler.sample(torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import pyro.poutine as poutine
import torch

from .data import OBS, HierarchicalData
from .drops import DropTally
from .errors import ConfigError, TrainingError
from .layout import structure_counts
from .structure import ModelStructure, batched

__all__ = ["StructureSampler", "simulate", "simulate_counted", "Simulation", "DropTally"]

log = logging.getLogger(__name__)

CovariateSpec = Callable[[int, torch.Generator], torch.Tensor] | Mapping[str, Any]


def _draw_covariate(spec: CovariateSpec, n: int, gen: torch.Generator, name: str) -> torch.Tensor:
    if callable(spec):
        return torch.as_tensor(spec(n, gen), dtype=torch.get_default_dtype()).reshape(n)
    kind = spec.get("dist", "normal")
    if kind == "normal":
        return spec.get("loc", 0.0) + spec.get("scale", 1.0) * torch.randn(n, generator=gen)
    if kind == "uniform":
        lo, hi = spec.get("low", 0.0), spec.get("high", 1.0)
        return lo + (hi - lo) * torch.rand(n, generator=gen)
    if kind == "bernoulli":
        return (torch.rand(n, generator=gen) < spec.get("p", 0.5)).to(torch.get_default_dtype())
    if kind == "integer":  # uniform on the integers low..high inclusive (Binomial trials, counts of exposure)
        lo, hi = int(spec.get("low", 0)), int(spec.get("high", 1))
        return torch.randint(lo, hi + 1, (n,), generator=gen).to(torch.get_default_dtype())
    raise ConfigError(f"covariate '{name}': unknown dist '{kind}' (normal, uniform, bernoulli, integer or a callable)")


class StructureSampler:
    """Draws dataset structures for training.

    Args:
        levels: level names, outermost first.
        groups: ``{level: (lo, hi)}``: the number of groups of the outermost level, and for each
            inner level the number of children per parent group (inclusive ranges).
        obs: ``(lo, hi)`` observations per innermost group.
        covariates: ``{level or "obs": {name: spec}}``; a spec is ``{"dist": "normal", "loc": 0,
            "scale": 1}``, ``{"dist": "uniform", "low", "high"}``, ``{"dist": "bernoulli", "p"}``,
            ``{"dist": "integer", "low", "high"}`` (integers low..high, both included) or a callable
            ``(n, generator) -> tensor[n]``.
        template: a dataset to reuse as is (``fixed``): every draw returns its structure.
        vary_sizes: each structure first draws its own sub-range of every inner range (children per
            parent and observations per group: two uniform draws inside ``(lo, hi)``, sorted) and its
            groups' sizes from that. Every group stays inside the trained range, but datasets of only
            small or only large groups are as common as mixed ones, so the number of groups and the
            number of rows vary apart (without it, rows ~ groups x the mean size, and what depends on
            the group size alone cannot be learned).
    """

    def __init__(
        self,
        levels: Sequence[str],
        groups: Mapping[str, tuple[int, int]] | None = None,
        obs: tuple[int, int] = (1, 1),
        covariates: Mapping[str, Mapping[str, CovariateSpec]] | None = None,
        template: HierarchicalData | None = None,
        vary_sizes: bool = False,
    ) -> None:
        self.levels = tuple(levels)
        self.template = template
        self.vary_sizes = bool(vary_sizes)
        self.groups = {lvl: tuple(int(v) for v in groups[lvl]) for lvl in self.levels} if groups else {}
        self.obs = tuple(int(v) for v in obs)
        self.covariates = {lvl: dict(c) for lvl, c in (covariates or {}).items()}
        if template is None:
            for lvl in self.levels:
                if lvl not in self.groups:
                    raise ConfigError(f"groups: no range for level '{lvl}'")
            for key, (lo, hi) in list(self.groups.items()) + [("obs", self.obs)]:
                if not 1 <= lo <= hi:
                    raise ConfigError(f"groups['{key}']: need 1 <= lo <= hi, got ({lo}, {hi})")
            for lvl in self.covariates:
                if lvl != OBS and lvl not in self.levels:
                    raise ConfigError(f"covariates: unknown level '{lvl}' (levels {list(self.levels)} or 'obs')")

    @classmethod
    def fixed(cls, data: HierarchicalData) -> StructureSampler:
        """A sampler that always returns ``data``'s structure and covariates (its response dropped)."""
        return cls(data.levels, template=data.with_response(None))

    def sample(self, gen: torch.Generator) -> HierarchicalData:
        """One random structure (``y`` is None)."""
        if self.template is not None:
            return self.template

        def counts(lo: int, hi: int, n: int) -> torch.Tensor:
            return torch.randint(lo, hi + 1, (n,), generator=gen)

        def sizes_of(lo: int, hi: int, n: int) -> torch.Tensor:
            if self.vary_sizes:
                lo, hi = sorted(int(v) for v in counts(lo, hi, 2))
            return counts(lo, hi, n)

        parents: dict[str, torch.Tensor] = {}
        n_groups = int(counts(*self.groups[self.levels[0]], 1))
        sizes = {self.levels[0]: n_groups}
        for lvl in self.levels[1:]:
            c = sizes_of(*self.groups[lvl], n_groups)
            parents[lvl] = torch.repeat_interleave(torch.arange(n_groups), c)
            n_groups = sizes[lvl] = int(c.sum())
        group = torch.repeat_interleave(torch.arange(n_groups), sizes_of(*self.obs, n_groups))
        cov = {
            lvl: {
                name: _draw_covariate(spec, len(group) if lvl == OBS else sizes[lvl], gen, name)
                for name, spec in specs.items()
            }
            for lvl, specs in self.covariates.items()
        }
        return HierarchicalData(self.levels, parents, group, covariates=cov)

    def ranges(self) -> dict[str, Any]:
        """The training range (for out-of-range flags): groups of the outermost level, children per parent
        group of each inner level, observations per innermost group."""
        if self.template is not None:  # the quantities the flags compare (children per parent for inner levels)
            return structure_counts(self.template)
        return {**{k: list(v) for k, v in self.groups.items()}, "obs": list(self.obs)}


class Simulation:
    """B simulated datasets sharing one structure: ``data.y`` is ``[B, N]``; ``latents`` maps each
    latent site to its value in the batched layout ``[1, B, *plates, *event]``.

    ``requested`` datasets were drawn; ``dropped`` counts, per site, those left out because of it
    (a non-finite response, a latent outside its support, or a sampler that raised), each under the
    first such site; ``error``: the first sampler's error, if one raised.
    """

    def __init__(
        self,
        data: HierarchicalData,
        latents: dict[str, torch.Tensor],
        requested: int | None = None,
        dropped: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        self.data = data
        self.latents = latents
        self.requested = int(requested if requested is not None else data.batch_size or 0)
        self.dropped = dict(dropped or {})
        self.error = error

    def split(self, size: int) -> list[Simulation]:
        """The datasets in consecutive pieces of at most ``size`` (one piece: this simulation itself);
        ``requested`` and ``dropped`` stay with the first piece, so the pieces add up to this one."""
        B = self.data.batch_size or 1
        if size >= B:
            return [self]
        out = []
        for start in range(0, B, max(1, int(size))):
            stop = min(B, start + max(1, int(size)))
            y = self.data.y[start:stop]  # [b, N]
            latents = {k: v[:, start:stop] for k, v in self.latents.items()}  # [1, b, *plates, *event]
            first = start == 0
            out.append(
                Simulation(
                    self.data.with_response(y), latents, self.requested if first else 0, self.dropped if first else {}
                )
            )
        return out


def simulate(
    model: Callable,
    structure: ModelStructure,
    data: HierarchicalData,
    num_datasets: int,
    given: Mapping[str, torch.Tensor] | None = None,
) -> Simulation:
    """Draw ``num_datasets`` datasets from the prior predictive on ``data``'s structure; ``given``:
    values of some latent sites (batched layout ``[1, num_datasets, 1.., *event]``), the rest drawn
    from the model given them.

    Datasets whose response is not finite, or whose latents are not inside their support (a
    positive scale that underflowed to 0: no finite unconstrained value), are dropped, so fewer may
    come back; ``Simulation.dropped`` counts them per site (see :class:`DropTally`). Argument checks
    are off while simulating: such a draw would otherwise raise inside the model (a Normal with
    scale 0) and end training. A sampler that raises all the same (torch's Bernoulli on a NaN
    probability, from a logit inf x 0) drops the datasets that made it raise, under the site
    that raised. The batch is simulated again in halves, given the values drawn before the site
    raised, down to single datasets: each half draws that site from the same parameters, so
    exactly the datasets whose draws made it raise are dropped, and counted.

    The error of such a site is kept in ``Simulation.error``.
    """
    try:
        return _simulate_once(model, structure, data, num_datasets, given)
    except _SamplerRaised as raised:  # a sampler refused a parameter (Bernoulli probs NaN) in some dataset
        if num_datasets == 1:
            error = f"sampling site '{raised.site}' raised: {raised.message}"
            return Simulation(_empty(structure, data), {}, 1, {raised.site or "?": 1}, error)
        drawn = {**(given or {}), **raised.drawn}
        half = num_datasets // 2
        parts = [
            simulate(model, structure, data, n, _slice_given(drawn, start, n))
            for start, n in ((0, half), (half, num_datasets - half))
        ]
        return _concat(parts, structure, data)


class _SamplerRaised(Exception):
    """A sampler raised at ``site``; ``drawn``: the latent sites drawn before it (batched ``[1, B, ...]``)."""

    def __init__(self, site: str | None, drawn: dict[str, torch.Tensor], cause: Exception) -> None:
        super().__init__(site)
        self.site, self.drawn = site, drawn
        self.message = (str(cause).splitlines() or [type(cause).__name__])[0]  # pyro appends the trace's shapes


class _CurrentSite(poutine.messenger.Messenger):
    """Remembers the last sample site entered, to name it when its sampler raises."""

    site: str | None = None

    def _pyro_sample(self, msg: dict) -> None:
        self.site = msg["name"]


def _empty(structure: ModelStructure, data: HierarchicalData) -> HierarchicalData:
    """``data``'s structure with no dataset in it (every dataset dropped)."""
    return structure.complete(data).with_response(torch.zeros(0, data.n_obs, device=data.group.device))


def _slice_given(given: Mapping[str, torch.Tensor] | None, start: int, n: int) -> dict[str, torch.Tensor] | None:
    return None if not given else {k: v.narrow(1, start, n) for k, v in given.items()}


def _concat(parts: Sequence[Simulation], structure: ModelStructure, data: HierarchicalData) -> Simulation:
    """Simulations of disjoint datasets as one (datasets in order; requested and drops added up)."""
    kept = [p for p in parts if p.data.batch_size]
    dropped: dict[str, int] = {}
    for p in parts:
        for k, v in p.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
    requested = sum(p.requested for p in parts)
    error = next((p.error for p in parts if p.error), None)
    if not kept:
        return Simulation(_empty(structure, data), {}, requested, dropped, error)
    y = torch.cat([p.data.y for p in kept], 0)
    latents = {k: torch.cat([p.latents[k] for p in kept], 1) for k in kept[0].latents}
    return Simulation(kept[0].data.with_response(y), latents, requested, dropped, error)


def _simulate_once(
    model: Callable,
    structure: ModelStructure,
    data: HierarchicalData,
    num_datasets: int,
    given: Mapping[str, torch.Tensor] | None,
) -> Simulation:
    fn = batched(model if not given else poutine.condition(model, data=dict(given)), structure.max_plate_nesting)
    current, tracer = _CurrentSite(), poutine.trace(fn)
    latent_names = {site.name for site in structure.latents}
    with torch.no_grad(), pyro.validation_enabled(False):
        try:
            with current:
                tr = tracer.get_trace(data.with_response(None), 1, num_datasets)
        except (RuntimeError, ValueError) as exc:
            drawn = {name: node["value"] for name, node in tracer.trace.nodes.items() if name in latent_names}
            raise _SamplerRaised(current.site, drawn, exc) from exc
    y = tr.nodes[structure.response]["value"].reshape(num_datasets, data.n_obs)
    latents = {s.name: tr.nodes[s.name]["value"].detach() for s in structure.latents}
    ok = torch.ones(num_datasets, dtype=torch.bool, device=y.device)
    dropped: dict[str, int] = {}
    checks = [
        (site.name, torch.isfinite(site.unconstrain(latents[site.name]).reshape(1, num_datasets, -1)).all(-1)[0])
        for site in structure.latents
    ]
    checks.append((structure.response, torch.isfinite(y).all(-1) & (y.abs() < 1e12).all(-1)))
    for name, good in checks:  # each dropped dataset is counted once, under the first site at fault
        lost = int((ok & ~good).sum())
        if lost:
            dropped[name] = lost
        ok &= good
    if dropped:
        keep = torch.nonzero(ok).squeeze(-1)
        y = y[keep]
        latents = {k: v.index_select(1, keep) for k, v in latents.items()}
    # a model with latents per row: the datasets carry the rows as its innermost level (structure.complete)
    return Simulation(structure.complete(data).with_response(y.detach()), latents, num_datasets, dropped)


def simulate_counted(
    model: Callable,
    structure: ModelStructure,
    data: HierarchicalData,
    num_datasets: int,
    tally: DropTally,
    given: Mapping[str, torch.Tensor] | None = None,
) -> Simulation:
    """:func:`simulate` (of ``given`` values of some sites), counting its drops in ``tally``; a batch
    that comes back empty is drawn again once (a model that drops everything: the tally's limit, or
    the second empty batch, stops it).

    Raises:
        TrainingError: the tally's share of dropped simulations is over its limit, or two batches in a
            row came back empty (naming the sites, and the error of a sampler that raised).
    """
    for _ in range(2):
        sim = simulate(model, structure, data, num_datasets, given)
        tally.add(sim)
        if sim.data.batch_size:
            return sim
    why = f"; {sim.error}" if sim.error else ""
    raise TrainingError(
        f"simulation: every one of 2 x {num_datasets} prior-predictive datasets in a row was dropped"
        f" ({tally.by_site()}){why}. Make every prior draw give finite values"
    )
