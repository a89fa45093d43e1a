"""The range of inputs an amortizer was trained on, beyond structure: response scale and covariates.

An amortized posterior is only as good as its training distribution around the data it is asked
about. :func:`training_ranges` simulates datasets the way training does (structures from the
amortizer's sampler, responses from the prior predictive) and records, over all of them,

* ``response``: the range of each dataset's response mean and log standard deviation;
* ``covariates``: the range of every covariate's values (per name, any level);

next to the structural ranges of the sampler (groups per level, observations per group).
:func:`value_flags` names what in a dataset lies outside them. ``Amortizer.ranges`` computes and
keeps these (checkpoints carry them); ``Posterior.range_flags`` reports them.

Example:
    >>> ranges = training_ranges(amortizer)  # doctest: +SKIP
    >>> value_flags(new_data, ranges)  # doctest: +SKIP
    ["response 'y': log sd 3.2 above the training range -4.1 to 1.9"]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .data import HierarchicalData

if TYPE_CHECKING:
    from .amortizer import Amortizer

__all__ = ["training_ranges", "response_stats", "value_flags"]

_SD_FLOOR = 1e-12  # a constant response has log sd log(1e-12), not -inf


def response_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per dataset mean and log standard deviation of the response ``[N]`` or ``[B, N]``: ``([B], [B])``."""
    y = y.double().reshape(-1, y.shape[-1])  # [B, N]
    sd = y.std(-1, unbiased=False) if y.shape[-1] > 1 else torch.zeros(y.shape[0], dtype=y.dtype)
    return y.mean(-1), sd.clamp(min=_SD_FLOOR).log()


@torch.no_grad()
def training_ranges(
    amortizer: Amortizer, num_structures: int = 16, batch_size: int = 128, seed: int | None = None
) -> dict[str, Any]:
    """Structure, response and covariate ranges of the amortizer's training simulations.

    Simulates ``num_structures`` structures x ``batch_size`` datasets with a private generator and a
    forked torch RNG (neither the amortizer's training stream nor the caller's RNG moves).

    Args:
        amortizer: the amortizer; its sampler must be the training sampler.
        num_structures: structures drawn from the sampler (training's pilot uses 16).
        batch_size: datasets simulated per structure.
        seed: default ``amortizer.seed + 7919``.

    Returns:
        ``{**sampler.ranges(), "response": {"mean": [lo, hi], "log_sd": [lo, hi]},
        "covariates": {name: [lo, hi]}}`` (plain floats and lists, as checkpoints store them).
    """
    seed = amortizer.seed + 7919 if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    means, log_sds = [], []
    cov: dict[str, list[float]] = {}
    devices = [amortizer.device] if amortizer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for _ in range(num_structures):
            sim = amortizer.simulate_batch(gen, batch_size)
            for name, values in sim.data.x.items():
                lo, hi = float(values.min()), float(values.max())
                old = cov.get(name, [lo, hi])
                cov[name] = [min(old[0], lo), max(old[1], hi)]
            if sim.data.y is None or sim.data.y.numel() == 0:
                continue
            m, s = response_stats(sim.data.y)
            means.append(m)
            log_sds.append(s)
    out: dict[str, Any] = {**amortizer.sampler.ranges(), "covariates": cov}
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
    """Response scale and covariate values of ``data`` outside ``ranges`` (from :func:`training_ranges`).

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
