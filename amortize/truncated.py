"""Truncated proposals around ONE observed dataset (truncated sequential NPE, Deistler, Goncalves and
Macke 2022), made hierarchical: a data source of the one training loop (:mod:`amortize.sources`).

A user with one real dataset and a weakly informative prior often has a prior predictive that is
mostly useless or absurd (a Normal(0, 2) slope on a covariate up to 13 in a log-linear Poisson model:
a quarter of the simulated datasets overflow). :class:`Truncated` trains on simulations whose globals
are drawn from the prior restricted to the highest-density region of the current q(globals | x_o):

* round 0 (a fresh amortizer): the prior predictive itself, on x_o's structure and covariates;
* round r >= 1: the region ``{u : log q_r(u | x_o) >= t_r}``, ``t_r`` the ``quantile`` (1e-4) of
  ``log q_r`` over ``support_draws`` draws of q_r, q_r the guide's q(globals | x_o) frozen at the
  round's first step; globals are drawn from the prior and kept inside the region (rejection), and
  the group latents and the response from the model given them.

Why the posterior at x_o stays right: NPE trained on the proposal ``p(globals) 1[region] p(groups |
globals) p(y | ...)`` learns ``p(latents | y) 1[region] / P(region | y)``, the posterior itself at
x_o as long as the region holds its mass (TSNPE's argument; 1e-4 of q's mass is left out). Only the
globals are truncated: in their few dimensions rejection from the prior is cheap, and the group
latents keep their exact conditional prior, which holds for any number of groups. Simulations whose
response is not finite are dropped and reported but never stop training here: removing datasets by
their response leaves ``p(latents | y)`` unchanged at every finite y (x_o among them), so it only costs
simulation time. Drops for a latent outside its support (a LogNormal draw under a HalfCauchy scale that
overflows) truncate the prior where floating point cannot represent it, as the region truncates it
where q at x_o has no mass: they are reported too, not limited (a posterior at x_o with mass there could
not be represented either; the verdict judges the result).

What came of each round (the usable share of the prior, the acceptance) is :meth:`Truncated.report`,
kept by the amortizer (``amortizer.truncation``), saved and resumed with it. The amortized posterior
is then a posterior for x_o (and datasets like it): ``amortizer.posterior(x_o).diagnostics()``
decides whether to trust it.

Example:
    >>> amortizer = am.Amortizer(model, x_o)  # x_o's fixed structure  # doctest: +SKIP
    >>> amortizer.fit(source=Truncated(x_o, rounds=4), steps=2000)  # doctest: +SKIP
    >>> amortizer.truncation["rounds"][-1]["acceptance"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger

from .batch import check_data
from .data import HierarchicalData
from .errors import DataError, TrainingError
from .objectives import backward_in_chunks
from .ranges import record_ranges
from .simulate import DropTally, Simulation, StructureSampler, simulate_counted
from .sources import same_dataset
from .structure import batched
from .train import TrainConfig, batch_loss, pilot_fit

if TYPE_CHECKING:
    from .amortizer import Amortizer

__all__ = ["Truncated", "MIN_ACCEPTANCE"]

MIN_ACCEPTANCE = 1e-4  # fewer prior draws than this share inside the region ends training (after 10^6 tried)


class _Drawn(Exception):
    """Ends a prior run of the model at its last global site."""


class _StopAfter(Messenger):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def _pyro_post_sample(self, msg: Any) -> None:
        if msg["name"] == self.name:
            raise _Drawn


class _Region:
    """The round's frozen q(globals | x_o) and its density threshold."""

    def __init__(self, head: torch.nn.Module, emb: torch.Tensor, standardizer: tuple, threshold: float) -> None:
        self.head, self.emb, self.standardizer, self.threshold = head, emb, standardizer, float(threshold)
        self.q = head(emb, 0, standardizer=standardizer)  # batch [1], event [D]

    def inside(self, u: torch.Tensor) -> torch.Tensor:
        """``[m]``: which of the globals ``u [m, D]`` lie inside the region."""
        lp = self.q.log_prob(u.to(self.emb.dtype).unsqueeze(-2)).squeeze(-1)
        return torch.isfinite(lp) & (lp >= self.threshold)

    def state(self) -> dict[str, Any]:
        return {
            "head": self.head.state_dict(),
            "embedding": self.emb,
            "shift": self.standardizer[0],
            "scale": self.standardizer[1],
            "threshold": self.threshold,
        }

    @classmethod
    def from_state(cls, template: torch.nn.Module, state: dict[str, Any]) -> _Region:
        head = copy.deepcopy(template)
        head.load_state_dict(state["head"])
        head.requires_grad_(False)
        return cls(head, state["embedding"], (state["shift"], state["scale"]), state["threshold"])


class Truncated:
    """Simulations on ONE observed dataset's structure, the globals from the prior truncated to the
    highest-density region of the current q(globals | data), refreshed ``rounds`` times.

    Args:
        data: the observed dataset (``y [N]``) with the model's levels and covariates.
        rounds: training is cut into this many rounds of equal steps; round 0 of a fresh amortizer
            is the plain prior predictive, each later round truncates with q as it stands at its start
            (an amortizer already trained on the prior truncates from its first step).
        quantile: the share of q's mass the region leaves out (TSNPE's epsilon).
        support_draws: draws of q that place the threshold (at least 10 / quantile).

    Raises:
        DataError: ``data`` holds a batch or has no response, or the settings are out of range.
    """

    name = "truncated"

    def __init__(
        self, data: HierarchicalData, rounds: int = 4, quantile: float = 1e-4, support_draws: int = 1_000_000
    ) -> None:
        if not isinstance(data, HierarchicalData):
            raise DataError(f"Truncated: expected a HierarchicalData, got {type(data).__name__}")
        if data.y is None or data.y.dim() != 1:
            shape = None if data.y is None else tuple(data.y.shape)
            raise DataError(f"Truncated: expected one dataset with a response y [N], got {shape}")
        if not torch.isfinite(data.y).all():
            raise DataError("Truncated: the observed response has non-finite values")
        if int(rounds) < 1:
            raise DataError(f"Truncated: rounds must be >= 1, got {rounds}")
        if not 0.0 < float(quantile) < 0.5:
            raise DataError(f"Truncated: quantile must be in (0, 0.5), got {quantile}")
        if int(support_draws) * float(quantile) < 10:
            raise DataError(
                f"Truncated: support_draws {support_draws} places the {quantile:g} quantile on fewer than 10"
                f" draws; use at least {math.ceil(10 / float(quantile))}"
            )
        self.data = data
        self.rounds, self.quantile, self.support_draws = int(rounds), float(quantile), int(support_draws)
        self._region: _Region | None = None
        self._record: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the loop's protocol
    def setup(self, amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> None:
        """Check the data, start or resume the record, and run the pilot on prior simulations when needed."""
        structure = amortizer.structure
        dtype = next(amortizer.guide.parameters()).dtype
        check_data(structure.complete(self.data), structure, amortizer.guide.encoder.cov_names, dtype)
        record = amortizer.truncation
        key = same_dataset(record, self.data, "Truncated: this amortizer was trained around")
        if record is None:
            pretrained = amortizer.step > 0
            if pretrained:  # trained on the prior: truncation is a new run from its first step
                amortizer.step, amortizer.optimizer, amortizer._optimizer_state = 0, None, None
            record = {"data": key, "pretrained": pretrained, "rounds": [], "region": None}
            amortizer.truncation = record
        self._record = record
        self._tally = DropTally(structure.response, exempt=[structure.response, *(t.name for t in structure.latents)])
        self._structure_data = self.data.to(amortizer.device, dtype).with_response(None)  # what the model runs on
        self._skeleton = self._structure_data.skeleton()  # the prior draws of the globals run on one row per group
        self._x = structure.complete(self.data).to(amortizer.device, dtype)  # what the guide reads (rows as a level)
        r = record.get("region")
        self._region = None if r is None else _Region.from_state(amortizer.guide.global_head, r)
        if not amortizer.pilot_done:
            sims = pilot_fit(_PriorOnData(amortizer, self), cfg, gen)  # type: ignore[arg-type]
            amortizer.ranges = record_ranges([s.data for s in sims], StructureSampler.fixed(self.data).ranges())
            amortizer.pilot_done = True

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def loss(self, amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
        """``cfg.objective`` on ``cfg.batch_size`` datasets from this step's proposal."""
        return batch_loss(amortizer, cfg, self.simulate(amortizer, cfg, cfg.batch_size))

    def backward(self, amortizer: Amortizer, cfg: TrainConfig, gen: torch.Generator) -> float:
        """:meth:`loss` with its gradients accumulated in pieces of the batch (as :class:`PriorPredictive`)."""
        return backward_in_chunks(amortizer, cfg, self.simulate(amortizer, cfg, cfg.batch_size), batch_loss)

    def datasets_per_step(self, cfg: TrainConfig) -> int:
        return int(cfg.batch_size)

    # ------------------------------------------------------------------ proposals
    def round_of(self, step: int, cfg: TrainConfig) -> int:
        """The round of training step ``step`` (the refinement steps, if any, stay in the last round)."""
        return min(self.rounds - 1, int(step) * self.rounds // max(1, int(cfg.steps)))

    def simulate(self, amortizer: Amortizer, cfg: TrainConfig, num_datasets: int) -> Simulation:
        """``num_datasets`` datasets from the proposal of the amortizer's current step."""
        assert self._record is not None, "Truncated.simulate before setup"
        r = self.round_of(amortizer.step, cfg)
        truncate = r > 0 or self._record["pretrained"]
        entry = self._entry(r, amortizer.step, truncate)
        if truncate and entry["threshold"] is None:  # a round's first step: q is frozen here
            self._region = self._new_region(amortizer)
            self._record["region"] = self._region.state()
            entry["threshold"] = self._region.threshold
        given = None
        if truncate:
            given = self._accepted_globals(amortizer, num_datasets, entry)
        before = self._tally.requested, dict(self._tally.dropped)
        sim = simulate_counted(
            amortizer.model, amortizer.structure, self._structure_data, num_datasets, self._tally, given
        )
        entry["requested"] += self._tally.requested - before[0]
        for site, n in self._tally.dropped.items():
            lost = n - before[1].get(site, 0)
            if lost:
                entry["dropped"][site] = entry["dropped"].get(site, 0) + lost
        entry["usable"] = 1.0 - sum(entry["dropped"].values()) / max(entry["requested"], 1)
        return sim

    def _entry(self, r: int, step: int, truncate: bool) -> dict[str, Any]:
        rounds = self._record["rounds"]
        if not rounds or rounds[-1]["round"] != r:
            rounds.append(
                {
                    "round": r,
                    "start_step": int(step),
                    "truncated": bool(truncate),
                    "threshold": None,
                    "proposed": 0,
                    "accepted": 0,
                    "acceptance": 1.0,
                    "requested": 0,
                    "dropped": {},
                    "usable": 1.0,
                }
            )
        return rounds[-1]

    @torch.no_grad()
    def _new_region(self, amortizer: Amortizer) -> _Region:
        guide = amortizer.guide
        was_training = guide.training
        guide.eval()
        try:
            enc = guide.encode(self._x)
        finally:
            guide.train(was_training)
        D = amortizer.structure.global_dim
        head = copy.deepcopy(guide.global_head).requires_grad_(False)
        emb = enc["embedding"].reshape(1, -1).detach()
        shift, scale = (t.reshape(1, D).detach() for t in enc["standardizer"])
        region = _Region(head, emb, (shift, scale), float("-inf"))
        lp = region.q.log_prob(region.q.sample((self.support_draws,))).reshape(-1)
        lp = lp[torch.isfinite(lp)]
        if lp.numel() < 100:
            raise TrainingError("truncation: q(globals | data) gives no finite draws; the guide diverged")
        region.threshold = float(torch.quantile(lp.double()[:16_000_000], self.quantile))
        return region

    def prior_globals(self, amortizer: Amortizer, num: int) -> dict[str, torch.Tensor]:
        """``num`` prior draws of the global sites (batched layout ``[1, num, 1.., *event]``), the model
        run on the dataset's skeleton and stopped at its last global site."""
        structure = amortizer.structure
        last = structure.global_sites[-1].name
        fn = batched(amortizer.model, structure.max_plate_nesting)

        def until_globals(*args: Any) -> Any:
            with _StopAfter(last):
                return fn(*args)

        handler = poutine.trace(until_globals)
        with torch.no_grad(), pyro.validation_enabled(False):
            try:
                handler(self._skeleton, 1, num)
            except _Drawn:
                pass
        nodes = handler.msngr.trace.nodes
        return {s.name: nodes[s.name]["value"].detach() for s in structure.global_sites}

    def _accepted_globals(self, amortizer: Amortizer, num: int, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``num`` prior draws of the globals inside the region (rejection), in the batched layout."""
        structure, region = amortizer.structure, self._region
        assert region is not None
        kept: list[dict[str, torch.Tensor]] = []
        have = 0
        while have < num:
            rate = entry["accepted"] / entry["proposed"] if entry["proposed"] else 0.5
            m = int(min(65536, max(64, math.ceil(1.3 * (num - have) / max(rate, 1e-3)))))
            values = self.prior_globals(amortizer, m)
            u = torch.cat([s.unconstrain(values[s.name]).reshape(m, s.dim) for s in structure.global_sites], -1)
            ok = torch.isfinite(u).all(-1)
            ok[ok.clone()] = region.inside(u[ok])
            need = num - have
            idx = torch.nonzero(ok).squeeze(-1)[:need]
            # the draws it took: up to the last one kept when this batch completes the request
            entry["proposed"] += int(idx[-1]) + 1 if idx.numel() == need else m
            entry["accepted"] += int(idx.numel())
            entry["acceptance"] = entry["accepted"] / entry["proposed"]
            if idx.numel():
                kept.append({k: v.index_select(1, idx) for k, v in values.items()})
                have += int(idx.numel())
            elif entry["proposed"] >= 1_000_000 and entry["acceptance"] < MIN_ACCEPTANCE:
                raise TrainingError(
                    f"truncation: {entry['accepted']} of {entry['proposed']} prior draws of the globals"
                    f" ({[s.name for s in structure.global_sites]}) fall inside the region where q(globals |"
                    " data) has its mass: the prior and this posterior barely overlap (a prior far from the"
                    " data, or a guide that diverged)"
                )
        return {k: torch.cat([part[k] for part in kept], 1) for k in kept[0]}

    def report(self) -> list[dict[str, Any]]:
        """Per round: its first step, whether it truncated, the threshold, prior draws of the globals
        proposed and accepted (``acceptance``), datasets simulated (``requested``), dropped per site,
        and the usable share of them."""
        return [] if self._record is None else copy.deepcopy(self._record["rounds"])


class _PriorOnData:
    """What :func:`~amortize.train.pilot_fit` needs of an amortizer: simulations from the prior
    predictive on the dataset's structure, counted in the source's tally."""

    def __init__(self, amortizer: Amortizer, source: Truncated) -> None:
        self.guide, self.structure, self.model = amortizer.guide, amortizer.structure, amortizer.model
        self.source = source

    def simulate_batch(self, gen: torch.Generator, num_datasets: int) -> Simulation:
        s = self.source
        return simulate_counted(self.model, self.structure, s._structure_data, num_datasets, s._tally)
