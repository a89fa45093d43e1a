"""Accuracy and speed of a trained amortizer against the best ground truth there is for its model.

* A model with a published reference posterior (:data:`REFERENCES`: radon Minnesota against
  Inference Gym's ground-truth means and sds, eight schools against posteriordb's reference draws)
  is compared with it on the real data the reference was computed for (:func:`against_reference`);
* any other model (or every model when NUTS is asked for) is compared with NUTS on held-out
  datasets simulated from the model, through :func:`~amortize.validate.heldout.against_nuts`.

:func:`reference_for` picks the reference of a model spec (before the amortizer is loaded: a model
compared with its reference needs no training sampler). Both comparisons return a
:class:`~amortize.validate.heldout.Report`; ``amortize bench`` prints and writes them.

Example:
    >>> ref = reference_for("amortize.models:eight_schools")  # doctest: +SKIP
    >>> print(against_reference(amortizer, ref, num_samples=1000).table())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..data import HierarchicalData
from ..errors import ConfigError, ReferenceNotFoundError
from . import reference
from .heldout import Compared, Report
from .metrics import ReferenceMoments, compare, summarize

if TYPE_CHECKING:
    from ..amortizer import Amortizer

__all__ = ["Reference", "LoadedReference", "REFERENCES", "AGAINST", "reference_for", "against_reference"]

log = logging.getLogger(__name__)
AGAINST = ("auto", "reference", "nuts")


@dataclass(frozen=True)
class Reference:
    """A published posterior of one shipped model.

    Attributes:
        name: what the table calls it.
        load: returns ``(data, posterior)``: the dataset the reference was computed for, and
            reference draws (site -> ``[m, *shape]``) or :class:`ReferenceMoments`.
    """

    name: str
    load: Callable[[], tuple[HierarchicalData, Mapping[str, torch.Tensor] | ReferenceMoments]]


@dataclass(frozen=True)
class LoadedReference:
    """A reference posterior with the data it belongs to."""

    name: str
    data: HierarchicalData
    posterior: Mapping[str, torch.Tensor] | ReferenceMoments


def _radon() -> tuple[HierarchicalData, ReferenceMoments]:
    radon, moments = reference.radon_minnesota("halfnormal")
    return radon.to_hierarchical_data(), moments


def _eight_schools() -> tuple[HierarchicalData, dict[str, torch.Tensor]]:
    from ..models import eight_schools_data

    y, sigma, draws = reference.eight_schools()
    return eight_schools_data(y.tolist(), sigma.tolist()), draws


REFERENCES: dict[str, Reference] = {  # a config's model spec -> its reference
    "amortize.models.radon:radon_contextual_effects": Reference("Inference Gym", _radon),
    "amortize.models:eight_schools": Reference("posteriordb", _eight_schools),
}


def reference_for(model_spec: str, against: str = "auto") -> LoadedReference | None:
    """The reference posterior to compare a model with, or None for NUTS on held-out simulations.

    Args:
        model_spec: the model as a config names it (``package.module:function``).
        against: ``"auto"`` (the model's reference when it has one and its files are there, else
            None), ``"reference"`` (the reference or an error) or ``"nuts"`` (None).

    Raises:
        ConfigError: an unknown ``against``, or ``"reference"`` for a model without a reference.
        ReferenceNotFoundError: ``"reference"`` and the reference files are missing (names the path).
    """
    if against not in AGAINST:
        raise ConfigError(f"bench: against must be one of {', '.join(AGAINST)}, got {against!r}")
    ref = REFERENCES.get(model_spec) if against != "nuts" else None
    if against == "reference" and ref is None:
        known = ", ".join(sorted(REFERENCES))
        raise ConfigError(f"no reference posterior for model '{model_spec}' (known: {known}); use --against nuts")
    if ref is None:
        return None
    try:
        data, posterior = ref.load()
    except ReferenceNotFoundError as e:
        if against == "reference":
            raise
        log.warning("%s; comparing model '%s' with NUTS on held-out simulations instead", e, model_spec)
        return None
    return LoadedReference(ref.name, data, posterior)


def against_reference(
    amortizer: Amortizer, ref: LoadedReference, num_samples: int = 1000, seed: int = 0, k_sets: int = 4
) -> Report:
    """Compare the amortized posterior of ``ref.data`` with the reference posterior (Pareto k from
    ``k_sets`` independent sets of ``num_samples`` draws, pooled).

    Returns:
        A :class:`~amortize.validate.heldout.Report` of one dataset: rows, summary, the time of the
        amortized draws (no NUTS time: the reference was published), the posterior's diagnostics,
        and the draws beside the reference in ``compared`` (for figures).
    """
    levels = {s.name: s.level for s in amortizer.structure.latents}
    amortizer.posterior(ref.data).sample(10)  # warm-up: first-call overheads are not inference time
    t0 = time.perf_counter()
    post = amortizer.posterior(ref.data)
    draws = post.sample(num_samples, seed=seed)
    seconds = time.perf_counter() - t0
    rows = [{**r, "dataset": 0} for r in compare(draws, ref.posterior, levels, ref.data.labels)]
    return Report(
        rows=rows,
        summary=summarize(rows, by="level"),
        amortized_seconds=[seconds],
        diagnostics=[{"dataset": 0, **post.diagnostics(num_samples, seed, k_sets)}],
        compared=[Compared(0, dict(draws), ref.posterior, ref.name, dict(ref.data.labels))],
    )
