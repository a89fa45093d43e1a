"""Data terms from the model's own likelihood: per group, the score and the information of
log p(y | latents) with respect to that group's latents, at a reference point, by autograd through
the user's Pyro model.

For each level the level's sites are stacked into one vector per group (an intercept and a slope in
one plate are one term, so their correlation is seen), on the unconstrained scale. One Newton step
from the reference turns (score, information) into a Gaussian message ``N(location, information^-1)``:
for a Gaussian likelihood linear in the latents it is exact (the group's least-squares fit), for any
other likelihood a local approximation the networks correct. Nothing here assumes a family.

Cost: one forward and one backward pass through the model for the scores, and one more backward
pass per unconstrained coordinate of a level (Hessian-vector products), all O(rows): a row reads one
group of each plate, so the Hessian of the likelihood is block diagonal over the groups of a level
and a product with a vector of ones per coordinate gives every group's block at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import nn

from ..data import HierarchicalData
from ..plates import batched
from ..structure import LatentSite, ModelStructure

__all__ = [
    "DataTerm",
    "MODE_ITERATIONS",
    "TermRange",
    "data_terms",
    "group_terms",
    "level_dims",
    "reference_point",
    "site_term",
]

FLOOR = 1e-6  # information below this (a latent the data cannot see) is read as this
RELATIVE = 1e-6  # and below this share of a group's largest eigenvalue (a direction it cannot see)
TRUST = 0.05  # the likelihood's information is taken as at least this share of the posterior's (given the reference)
MAX_STEP = 2.0  # the largest move of one Newton step towards the mode, per unconstrained coordinate
MODE_ITERATIONS = 4  # the guide's steps towards the groups' mode before the terms are taken (A/B: 4 beat 0 on Poisson)


@dataclass(frozen=True)
class DataTerm:
    """The likelihood's local Gaussian message for every group of one level (or the globals).

    Fields (unconstrained scale, the level's sites stacked in ``sites`` order, D coordinates):
        sites: the site names, in stacking order.
        reference: the point the terms are taken at ``[B, G, D]`` (G = 1 for the globals).
        score: the gradient of log p(y | latents) there ``[B, G, D]``.
        information: minus its Hessian within a group ``[B, G, D, D]``, symmetrized.
        floor: the least information :attr:`precision` allows ``[B, G]`` (a share of the posterior's
            information where it is known: a trust region for the Newton step where the likelihood
            is not log-concave); ``FLOOR`` when None.
    """

    sites: tuple[str, ...]
    reference: torch.Tensor
    score: torch.Tensor
    information: torch.Tensor
    floor: torch.Tensor | None = None

    @property
    def precision(self) -> torch.Tensor:
        """The information made positive definite (eigenvalues floored at ``floor`` and at ``RELATIVE``
        times the largest) ``[B, G, D, D]``."""
        vals, vecs = self._eigen()
        return ((vecs * vals.unsqueeze(-2)) @ vecs.transpose(-1, -2)).to(self.information.dtype)

    @property
    def covariance(self) -> torch.Tensor:
        """The inverse of :attr:`precision` ``[B, G, D, D]``."""
        vals, vecs = self._eigen()
        return ((vecs / vals.unsqueeze(-2)) @ vecs.transpose(-1, -2)).to(self.information.dtype)

    @property
    def location(self) -> torch.Tensor:
        """One Newton step from the reference ``[B, G, D]``: where the likelihood alone puts the group."""
        return self.reference + (self.covariance @ self.score.unsqueeze(-1)).squeeze(-1)

    def _eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Floored eigenvalues ``[B, G, D]`` and eigenvectors of the information, in double precision."""
        info = self.information.double()
        floor = info.new_full(info.shape[:-2], FLOOR)
        if self.floor is not None:
            floor = torch.maximum(floor, self.floor.double())
        if info.shape[-1] == 1:
            return torch.maximum(info[..., 0], floor.unsqueeze(-1)), torch.ones_like(info)
        vals, vecs = torch.linalg.eigh(info)
        floor = torch.maximum(floor, RELATIVE * vals[..., -1].abs())
        return torch.maximum(vals, floor.unsqueeze(-1)), vecs


def _solve(term: DataTerm) -> torch.Tensor:
    """``precision^-1 score`` per group: the Newton step of a term."""
    return (term.covariance @ term.score.unsqueeze(-1)).squeeze(-1)


class _Fix(Messenger):
    """Give every latent sample site a fixed value: its prior mean (a median of draws where that is not finite)."""

    def __init__(self, draws: int = 64) -> None:
        super().__init__()
        self.draws = draws

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or isinstance(msg["fn"], _Subsample):
            return
        fn = msg["fn"]
        try:
            value = fn.mean
            ok = bool(torch.isfinite(value).all()) and bool(fn.support.check(value).all())
        except NotImplementedError:
            ok = False
        if not ok:
            value = fn.sample((self.draws,)).median(0).values
        msg["value"], msg["done"] = value.detach(), True


def reference_point(model: Callable, structure: ModelStructure, data: HierarchicalData) -> dict[str, torch.Tensor]:
    """Every latent at its conditional prior's centre, top down (globals at their prior means, each
    group at its prior's mean given its parents' reference): ``{site: value [1, B, *batched shape]}``."""
    fn = batched(model, structure.max_plate_nesting)
    with pyro.validation_enabled(False), poutine.block():
        tr = poutine.trace(_Fix()(fn)).get_trace(data, 1)
    return {s.name: tr.nodes[s.name]["value"] for s in structure.latents}


def data_terms(
    model: Callable,
    structure: ModelStructure,
    data: HierarchicalData,
    reference: dict[str, torch.Tensor] | None = None,
    iterations: int = 0,
    globals_too: bool = True,
) -> dict[str | None, DataTerm]:
    """``{level: DataTerm}`` (``None``: the globals) of log p(y | latents) for a dataset or a batch
    sharing one structure. The terms are taken at ``reference`` (default :func:`reference_point`)
    moved by ``iterations`` Newton steps of every level's group latents towards the mode of
    log p(y, groups | globals at the reference) (block by block, each step at most ``MAX_STEP``
    unconstrained units per coordinate): a point near where the posterior puts each group, so that
    one Newton step of the likelihood alone from there is a good location for any likelihood. No
    gradient flows out: the terms are statistics of the data. ``globals_too=False``: the group
    levels' terms only (the globals' Hessian costs one more backward pass per global coordinate)."""
    reference = reference_point(model, structure, data) if reference is None else reference
    u = {s.name: s.transform.inv(reference[s.name]).detach() for s in structure.latents}
    floors: dict[str, torch.Tensor] = {}
    for _ in range(iterations):
        for level, term in _terms_at(model, structure, data, u, with_priors=True, globals_too=False).items():
            floors[level] = TRUST * term._eigen()[0][..., 0].to(term.information.dtype)  # [B, G]
            step = _solve(term).clamp(-MAX_STEP, MAX_STEP)
            offset = 0
            for site in structure.sites_at(level):
                part = step[..., offset : offset + site.dim]
                u[site.name] = u[site.name] + part.reshape(u[site.name].shape).to(u[site.name].dtype)
                offset += site.dim
    out = _terms_at(model, structure, data, u, with_priors=False, globals_too=globals_too)
    return {level: replace(term, floor=floors.get(level)) for level, term in out.items()}


def _terms_at(
    model: Callable,
    structure: ModelStructure,
    data: HierarchicalData,
    u: dict[str, torch.Tensor],
    with_priors: bool,
    globals_too: bool,
) -> dict[str | None, DataTerm]:
    """The terms of log p(y | latents) (``with_priors``: plus log p(groups | parents), the group
    sites' own priors) at the unconstrained values ``u``."""
    B = data.batch_size or 1
    leaves = {name: value.detach().requires_grad_(True) for name, value in u.items()}
    latent = {s.name for s in structure.latents}  # conditioned, so observed too
    groups = {s.name for s in structure.latents if s.level is not None}

    def counted(name: str, site: dict) -> bool:
        return site["is_observed"] and (name not in latent or (with_priors and name in groups))

    with torch.enable_grad():
        values = {s.name: s.transform(leaves[s.name]) for s in structure.latents}
        fn = poutine.condition(batched(model, structure.max_plate_nesting), data=values)
        with pyro.validation_enabled(False):
            tr = poutine.trace(fn).get_trace(data, 1)
        tr.compute_log_prob(site_filter=counted)
        objective = sum(
            site["log_prob"].sum()
            for name, site in tr.nodes.items()
            if site["type"] == "sample" and counted(name, site)
        )
        names = [s.name for s in structure.latents]
        grads = torch.autograd.grad(objective, [leaves[n] for n in names], create_graph=True, allow_unused=True)
        score = {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(names, grads)}
        out: dict[str | None, DataTerm] = {}
        for level in ((None,) if globals_too else ()) + tuple(structure.levels):
            sites = structure.global_sites if level is None else structure.sites_at(level)
            if sites:
                out[level] = _level_term(sites, leaves, score, B)
    return out


def _per_group(site: LatentSite, x: torch.Tensor, B: int) -> torch.Tensor:
    """A batched unconstrained value ``[1, B, *(1,), G?, *event]`` as ``[B, G, dim]`` (G = 1 for a global site)."""
    return x.reshape(B, 1 if site.level is None else -1, site.dim)


def _level_term(
    sites: list[LatentSite], leaves: dict[str, torch.Tensor], score: dict[str, torch.Tensor], B: int
) -> DataTerm:
    """Stack the level's sites and take the Hessian blocks per group, one coordinate at a time."""
    ref = torch.cat([_per_group(s, leaves[s.name].detach(), B) for s in sites], -1)
    sc = torch.cat([_per_group(s, score[s.name].detach(), B) for s in sites], -1)
    targets = [leaves[s.name] for s in sites]
    cols = []
    for s in sites:
        g = score[s.name]
        for j in range(s.dim):
            if not g.requires_grad:  # the likelihood does not read this site
                cols.append(torch.zeros_like(ref))
                continue
            v = torch.zeros_like(_per_group(s, g.detach(), B))
            v[..., j] = 1.0
            hv = torch.autograd.grad((g * v.reshape(g.shape)).sum(), targets, retain_graph=True, allow_unused=True)
            cols.append(
                torch.cat(
                    [
                        _per_group(t, h if h is not None else torch.zeros_like(leaves[t.name]), B)
                        for t, h in zip(sites, hv)
                    ],
                    -1,
                ).detach()
            )
    hess = torch.stack(cols, -1)  # [B, G, D, D]: column c = d score / d coordinate c
    return DataTerm(tuple(s.name for s in sites), ref, sc, -0.5 * (hess + hess.transpose(-1, -2)))


def site_term(term: DataTerm, sites: Sequence[LatentSite], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(location, log marginal precision)`` ``[B, G, d]`` of site ``name``'s coordinates in a level's
    term (``sites``: the level's sites in stacking order)."""
    offset = 0
    for s in sites:
        if s.name == name:
            break
        offset += s.dim
    sl = slice(offset, offset + s.dim)
    log_prec = -torch.diagonal(term.covariance, dim1=-2, dim2=-1).log()
    return term.location[..., sl], log_prec[..., sl]


class TermRange(nn.Module):
    """The range of one site's data term ``(location, log precision)`` in prior simulations (the central
    99.8% per coordinate, :meth:`fit`); :meth:`forward` clamps a term into it (NaN read as its middle), so
    a dataset more extreme than the simulations (a Cauchy-like response, a likelihood the Newton step does
    not fit) moves what reads the term no further than they did."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("bounds", torch.tensor([-math.inf, math.inf]).reshape(2, 1, 1).repeat(1, 2, dim))

    @torch.no_grad()
    def fit(self, term: tuple[torch.Tensor, torch.Tensor]) -> None:
        """``term``: simulated ``(location, log precision)`` ``[M, dim]`` each."""
        for i, t in enumerate(term):
            for j in range(t.shape[-1]):
                col = t[:, j][torch.isfinite(t[:, j])].double()
                if col.numel():
                    q = torch.quantile(col, col.new_tensor([0.001, 0.999]))
                    self.bounds[:, i, j] = q.to(self.bounds.dtype)

    def forward(self, term: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(location, log precision)`` ``[..., dim]`` each, clamped into the fitted range."""
        out = []
        for i, t in enumerate(term):
            lo, hi = self.bounds[0, i].to(t.dtype), self.bounds[1, i].to(t.dtype)
            mid = torch.where(torch.isfinite(lo + hi), 0.5 * (lo + hi), torch.zeros_like(lo))
            out.append(torch.maximum(torch.minimum(torch.where(torch.isnan(t), mid, t), hi), lo))
        return out[0], out[1]


def group_terms(model: Callable, structure: ModelStructure, data: HierarchicalData) -> dict[str | None, DataTerm]:
    """The terms the guide reads: every group level's, after ``MODE_ITERATIONS`` steps towards the mode."""
    return data_terms(model, structure, data, iterations=MODE_ITERATIONS, globals_too=False)


def level_dims(structure: ModelStructure) -> dict[str, int]:
    """``{level: D}``: the width of each group level's stacked term (levels without latent sites left out)."""
    dims = {lvl: sum(s.dim for s in structure.sites_at(lvl)) for lvl in structure.levels}
    return {lvl: d for lvl, d in dims.items() if d}
