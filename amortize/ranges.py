"""The range of inputs an amortizer was trained on, recorded at the pilot.

An amortized posterior is only as good as its training distribution around the data it is asked
about. Training's pilot already simulates ``pilot_structures x batch_size`` datasets the way
training does; :func:`record_ranges` records, over all of them,

* ``response``: the range of each dataset's response mean and log standard deviation;
* ``covariates``: the range of every covariate's values (per name, any level);

next to the structural ranges of the sampler (groups of the outermost level, children per parent
group of each inner level, observations per group). :func:`value_flags` names what in a dataset lies
outside them; checkpoints carry them; ``Posterior.range_flags`` reports them.

Example:
    >>> ranges = record_ranges([sim.data for sim in sims], sampler.ranges())  # doctest: +SKIP
    >>> value_flags(new_data, ranges)  # doctest: +SKIP
    ["response 'y': log sd 3.2 above the training range -4.1 to 1.9"]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .data import HierarchicalData

__all__ = ["record_ranges", "response_stats", "value_flags"]

_SD_FLOOR = 1e-12  # a constant response has log sd log(1e-12), not -inf


def response_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per dataset mean and log standard deviation of the response ``[N]`` or ``[B, N]``: ``([B], [B])``."""
    y = y.double().reshape(-1, y.shape[-1])  # [B, N]
    sd = y.std(-1, unbiased=False) if y.shape[-1] > 1 else torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    return y.mean(-1), sd.clamp(min=_SD_FLOOR).log()


@torch.no_grad()
def record_ranges(datasets: Sequence[HierarchicalData], structure: dict[str, Any]) -> dict[str, Any]:
    """Structure, response and covariate ranges of training simulations.

    Args:
        datasets: the simulated datasets (batches ``y [B, N]``) the pilot drew.
        structure: the structural ranges (``StructureSampler.ranges()``): ``{level: [lo, hi]}`` (groups
            of the outermost level, children per parent group of an inner one) and ``"obs": [lo, hi]``.

    Returns:
        ``{**structure, "response": {"mean": [lo, hi], "log_sd": [lo, hi]}, "covariates": {name: [lo, hi]}}``
        (plain floats and lists, as checkpoints store them).
    """
    means, log_sds = [], []
    cov: dict[str, list[float]] = {}
    for data in datasets:
        for name, values in data.x.items():
            lo, hi = float(values.min()), float(values.max())
            old = cov.get(name, [lo, hi])
            cov[name] = [min(old[0], lo), max(old[1], hi)]
        if data.y is None or data.y.numel() == 0:
            continue
        m, s = response_stats(data.y)
        means.append(m.cpu())
        log_sds.append(s.cpu())
    out: dict[str, Any] = {**structure, "covariates": cov}
    if means:
        m, s = torch.cat(means), torch.cat(log_sds)
        out["response"] = {"mean": [float(m.min()), float(m.max())], "log_sd": [float(s.min()), float(s.max())]}
    return out


def _outside(value: float, lo: float, hi: float) -> str | None:
    tol = 1e-6 * max(1.0, abs(lo), abs(hi))  # values that went through a float32 CSV round trip
    if value < lo - tol:
        return "below"
    if value > hi + tol or math.isnan(value):
        return "above"
    return None


def value_flags(data: HierarchicalData, ranges: dict[str, Any]) -> list[str]:
    """Response scale and covariate values of ``data`` outside ``ranges`` (from :func:`record_ranges`).

    Ranges without ``response`` / ``covariates`` entries (older checkpoints) give no flags for them.

    Returns:
        One message per problem, naming the response or covariate (and the dataset of a batch).
    """
    flags: list[str] = []
    resp = ranges.get("response")
    if resp and data.y is not None:
        m, s = response_stats(data.y)
        batch = data.batch_size is not None
        for b in range(m.shape[0]):
            where = f"dataset {b}: " if batch else ""
            for label, v, key in (("mean", float(m[b]), "mean"), ("log sd", float(s[b]), "log_sd")):
                lo, hi = resp[key]
                side = _outside(v, lo, hi)
                if side:
                    what = f"{where}response '{data.response}': {label} {v:.3g}"
                    flags.append(f"{what} {side} the training range {lo:.3g} to {hi:.3g}")
    for name, (lo, hi) in (ranges.get("covariates") or {}).items():
        if name not in data.x:
            continue
        x = data.x[name]
        mn, mx = float(x.min()), float(x.max())
        if _outside(mn, lo, hi) or _outside(mx, lo, hi):
            flags.append(f"covariate '{name}': values {mn:.3g} to {mx:.3g}, trained on {lo:.3g} to {hi:.3g}")
    return flags
