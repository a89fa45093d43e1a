"""The tally of prior-predictive simulations dropped during training (see :func:`amortize.simulate.simulate`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import TrainingError

if TYPE_CHECKING:
    from .simulate import Simulation

__all__ = ["DropTally"]

log = logging.getLogger("amortize.simulate")  # the drop warnings keep the logger name users filter on


class DropTally:
    """Simulated datasets drawn and dropped so far, per site.

    Dropping a simulation changes the prior that training sees, so a model that drops more than
    ``limit`` (1%) of them stops training: once the share observed exceeds the limit beyond Monte
    Carlo doubt (the Chernoff bound on the binomial tail below ``alpha``), so that one unlucky
    dataset in a small early batch does not.

    Args:
        response: the response site (its drops are non-finite values; a latent's, values outside its support).
        limit: the share of dropped simulations that stops training.
        alpha: how sure the share must be to exceed ``limit``.
        exempt: sites whose drops are counted and reported but do not count towards ``limit``.

    Attributes:
        requested: datasets simulated.
        dropped: ``{site: count}`` of those dropped.
    """

    def __init__(self, response: str, limit: float = 0.01, alpha: float = 1e-3, exempt: Sequence[str] = ()) -> None:
        self.response, self.limit, self.alpha = response, float(limit), float(alpha)
        self.exempt = frozenset(exempt)
        self.requested = 0
        self.dropped: dict[str, int] = {}

    @property
    def total(self) -> int:
        """Datasets dropped so far."""
        return sum(self.dropped.values())

    def add(self, sim: Simulation) -> None:
        """Count ``sim``'s drops.

        Raises:
            TrainingError: more than ``limit`` of the simulations are dropped; names the site that
                dropped most and the share.
        """
        first = self.total == 0
        self.requested += sim.requested
        for site, n in sim.dropped.items():
            self.dropped[site] = self.dropped.get(site, 0) + n
        if not sim.dropped:
            return
        (log.warning if first else log.debug)(
            "simulations: dropped %d of %d datasets so far (%s)", self.total, self.requested, self.by_site()
        )
        if self._beyond_limit():
            raise TrainingError(self.message())

    def by_site(self) -> str:
        """The drops per site, most first: ``site 'y': 3, site 'tau': 1``."""
        return ", ".join(f"site '{k}': {v}" for k, v in sorted(self.dropped.items(), key=lambda kv: -kv[1]))

    def _beyond_limit(self) -> bool:
        counted = sum(v for k, v in self.dropped.items() if k not in self.exempt)
        n, q, p = self.requested, counted / max(self.requested, 1), self.limit
        if q <= p:
            return False
        kl = q * math.log(q / p) + ((1 - q) * math.log((1 - q) / (1 - p)) if q < 1 else 0.0)
        return n * kl > math.log(1 / self.alpha)  # P(this many drops | rate = limit) < alpha

    def message(self) -> str:
        """What was dropped, naming the site that dropped most and the share."""
        counted = {k: v for k, v in self.dropped.items() if k not in self.exempt} or self.dropped
        site = max(counted, key=counted.get)
        why = "a non-finite response" if site == self.response else "a value outside its support"
        total = sum(counted.values())
        return (
            f"simulation: {total} of {self.requested} prior-predictive datasets"
            f" ({100 * total / max(self.requested, 1):.1f}%) were dropped, most for site '{site}' ({why};"
            f" {self.by_site()}); dropping more than {100 * self.limit:g}% changes the prior that training sees."
            " Make every prior draw give finite values (tighter priors, a stable parameterization)"
        )
