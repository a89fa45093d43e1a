"""Reference posteriors by NUTS on the user's own Pyro model, with the checks that make them trustworthy.

Each chain runs in-process as its own seeded ``pyro.infer.MCMC``; R-hat (rank-normalized split,
bulk and folded) and bulk ESS are computed over all chains per site and element. A run passes its
checks (:func:`checks_passed`) when no transition diverged, every element's bulk ESS reaches
``min_ess`` and every element's R-hat is below ``max_rhat``, raised for a site of many elements by
:func:`rhat_threshold` so that the site's largest R-hat is as unlikely to cross it by chance as one
element's R-hat is to cross ``max_rhat``. With ``reparam="auto"`` the model runs as written first
and, if the checks fail, again with every loc-scale latent non-centered
(``LocScaleReparam(centered=0)``); draws are always reported under the model's own site names.

Example:
    >>> res = run_nuts(model, data, num_warmup=300, num_samples=300)  # doctest: +SKIP
    >>> res.summary()  # doctest: +SKIP
    'NUTS (none): 2x300 draws in 9.8 s; max R-hat 1.004 (theta), min bulk ESS 412 (tau), 0 divergences: ok'
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, Predictive
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.util import site_is_subsample

from ..data import HierarchicalData
from ..errors import ConfigError, DataError, ModelStructureError
from .convergence import MAX_RHAT, MIN_ESS, checks_passed, rhat_thresholds, worst_diagnostics

__all__ = ["NUTSResult", "run_nuts", "cached_nuts", "cached_reference"]

logger = logging.getLogger(__name__)

# distributions that LocScaleReparam can decenter (loc, scale, plus copied shape params such as df)
_LOC_SCALE = (dist.Normal, dist.StudentT, dist.Cauchy, dist.Laplace)
_PARAMETERIZATIONS = ("auto", "none", "noncentered")
# code whose tensor-to-Python conversions under JIT tracing are structural constants, not latent values
_TRUSTED_PATHS = tuple(str(Path(m.__file__).resolve().parent) + os.sep for m in (pyro, torch)) + (
    str(Path(__file__).resolve().parents[1] / "data.py"),
)


@dataclass
class NUTSResult:
    """Draws and diagnostics of one NUTS run (all chains pooled).

    Attributes:
        samples: latent site -> ``[chains * num_samples, *site_shape]``, chain-major, model's site names.
        r_hat: site -> max over elements of the rank-normalized split R-hat (bulk and folded).
        ess_bulk: site -> min over elements of the bulk effective sample size.
        divergences: divergent transitions after warmup, all chains.
        seconds: wall time of this run (warmup, sampling, recovering original sites).
        parameterization: ``"none"`` (model as written) or ``"noncentered"``.
        ok: R-hat, ESS and divergence checks all passed (:func:`checks_passed`).
        num_chains: number of chains pooled in ``samples``.
        r_hat_threshold: site -> the R-hat threshold its ``r_hat`` was held to (:func:`rhat_thresholds`).
    """

    samples: dict[str, torch.Tensor]
    r_hat: dict[str, float]
    ess_bulk: dict[str, float]
    divergences: int
    seconds: float
    parameterization: str
    ok: bool
    num_chains: int = 1
    r_hat_threshold: dict[str, float] = field(default_factory=dict)

    def checks(self) -> dict[str, Any]:
        """The checks of this run, JSON-ready: verdict, R-hat (with the threshold applied) and ESS per site."""
        return {
            "ok": self.ok,
            "r_hat": dict(self.r_hat),
            "r_hat_threshold": dict(self.r_hat_threshold),
            "ess_bulk": dict(self.ess_bulk),
            "divergences": self.divergences,
            "parameterization": self.parameterization,
            "seconds": self.seconds,
        }

    def summary(self) -> str:
        """One line: parameterization, draws, time, worst R-hat and ESS with their sites, divergences, verdict."""
        n = next(iter(self.samples.values())).shape[0] if self.samples else 0
        worst_r = max(self.r_hat, key=self.r_hat.__getitem__, default=None)
        worst_e = min(self.ess_bulk, key=self.ess_bulk.__getitem__, default=None)
        r = f"{self.r_hat[worst_r]:.3f} ({worst_r})" if worst_r else "n/a"
        e = f"{self.ess_bulk[worst_e]:.0f} ({worst_e})" if worst_e else "n/a"
        return (
            f"NUTS ({self.parameterization}): {self.num_chains}x{n // max(self.num_chains, 1)} draws in "
            f"{self.seconds:.1f} s; max R-hat {r}, min bulk ESS {e}, {self.divergences} divergences: "
            f"{'ok' if self.ok else 'NOT ok'}"
        )


def run_nuts(
    model: Callable[[HierarchicalData], object],
    data: HierarchicalData,
    *,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 2,
    seed: int = 0,
    reparam: str = "auto",
    target_accept: float = 0.9,
    progress: bool = False,
    max_rhat: float = MAX_RHAT,
    min_ess: float = MIN_ESS,
    max_tree_depth: int = 10,
) -> NUTSResult:
    """Sample the posterior of ``model(data)`` (``data.y`` observed) with NUTS and check convergence.

    Args:
        model: a Pyro model of one dataset, ``model(data)``.
        data: one dataset (``data.y`` of shape ``[N]``).
        num_warmup: warmup (adaptation) iterations per chain.
        num_samples: kept draws per chain.
        num_chains: chains, run one after another, chain ``c`` seeded with ``seed + c``.
        seed: base seed.
        reparam: ``"auto"`` (as written, non-centered if the checks fail), ``"none"`` or ``"noncentered"``.
        target_accept: NUTS target acceptance probability.
        progress: show Pyro's progress bar.
        max_rhat: ``ok`` needs the R-hat of a one-element site below this; a site of K elements needs
            its largest R-hat below :func:`rhat_threshold` ``(max_rhat, K, ...)`` (see :func:`checks_passed`).
        min_ess: ``ok`` needs every bulk ESS at least this.
        max_tree_depth: NUTS maximum tree depth.

    Returns:
        The kept run: the first that passes the checks, else the better of the two tried.

    Raises:
        DataError: ``data`` has no response or holds a batch of datasets.
        ModelStructureError: the model has no latent site.
        ConfigError: an unknown ``reparam`` or fewer than 4 draws per chain.
    """
    if reparam not in _PARAMETERIZATIONS:
        raise ConfigError(f"run_nuts: reparam must be one of {_PARAMETERIZATIONS}, got {reparam!r}")
    if data.y is None or data.y.dim() != 1:
        shape = None if data.y is None else tuple(data.y.shape)
        raise DataError(f"run_nuts needs one dataset with response '{data.response}' of shape [N], got {shape}")
    if num_samples < 4:
        raise ConfigError(f"run_nuts: num_samples must be at least 4 for split R-hat, got {num_samples}")
    trace = poutine.trace(model).get_trace(data)
    latent = {
        name: tuple(site["value"].shape)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }
    if not latent:
        raise ModelStructureError("run_nuts: the model has no latent sample site (is data.y observed everywhere?)")
    loc_scale = [name for name in latent if isinstance(_unwrap(trace.nodes[name]["fn"]), _LOC_SCALE)]
    cfg = _Settings(
        num_warmup, num_samples, num_chains, seed, target_accept, progress, max_rhat, min_ess, max_tree_depth
    )
    if reparam == "noncentered" and not loc_scale:
        logger.info("run_nuts: no loc-scale latent site to non-center; running the model as written")
        reparam = "none"
    if reparam in ("none", "noncentered"):
        return _run(model, data, latent, loc_scale if reparam == "noncentered" else [], cfg)
    first = _run(model, data, latent, [], cfg)
    if first.ok or not loc_scale:
        return first
    logger.info("run_nuts: %s; retrying with %s non-centered", first.summary(), ", ".join(loc_scale))
    second = _run(model, data, latent, loc_scale, cfg)
    if second.ok:
        return second
    best = min((first, second), key=_badness)
    logger.warning("run_nuts: neither parameterization passed the checks; keeping %s", best.summary())
    return best


def _badness(res: NUTSResult) -> tuple[float, float, float]:
    return (res.divergences, max(res.r_hat.values()), -min(res.ess_bulk.values()))


def _unwrap(fn: torch.distributions.Distribution) -> torch.distributions.Distribution:
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


@dataclass(frozen=True)
class _Settings:
    num_warmup: int
    num_samples: int
    num_chains: int
    seed: int
    target_accept: float
    progress: bool
    max_rhat: float
    min_ess: float
    max_tree_depth: int


def _run(
    model: Callable, data: HierarchicalData, latent: dict[str, tuple[int, ...]], noncentered: list[str], cfg: _Settings
) -> NUTSResult:
    """One parameterization: run the chains, recover original sites, compute the diagnostics."""
    run_model = model
    if noncentered:
        run_model = poutine.reparam(model, config={name: LocScaleReparam(centered=0.0) for name in noncentered})
    start = time.perf_counter()
    chains: list[dict[str, torch.Tensor]] = []
    divergences = 0
    jit = True  # once compiling fails or looks unsafe, the remaining chains run eagerly
    for chain in range(cfg.num_chains):
        pyro.set_rng_seed(cfg.seed + chain)
        if jit:
            mcmc, jit = _run_jit(run_model, data, cfg)
            pyro.set_rng_seed(cfg.seed + chain)
        if not jit:
            kernel = NUTS(run_model, target_accept_prob=cfg.target_accept, max_tree_depth=cfg.max_tree_depth)
            mcmc = MCMC(kernel, cfg.num_samples, warmup_steps=cfg.num_warmup, disable_progbar=not cfg.progress)
            mcmc.run(data)
        draws = mcmc.get_samples()  # site -> [S, *shape]
        if noncentered:
            draws = _original_sites(run_model, data, draws, latent)
        chains.append({name: draws[name].detach() for name in latent})
        divergences += sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    seconds = time.perf_counter() - start
    r_hat: dict[str, float] = {}
    ess: dict[str, float] = {}
    for name in latent:
        r_hat[name], ess[name] = worst_diagnostics(torch.stack([c[name] for c in chains]))  # [C, S, *shape]
    samples = {name: torch.cat([c[name] for c in chains]) for name in latent}  # [C*S, *shape]
    res = NUTSResult(
        samples=samples,
        r_hat=r_hat,
        ess_bulk=ess,
        divergences=divergences,
        seconds=seconds,
        parameterization="noncentered" if noncentered else "none",
        ok=False,
        num_chains=cfg.num_chains,
    )
    res.ok = _judge(res, cfg.max_rhat, cfg.min_ess)
    logger.debug("run_nuts: %s", res.summary())
    return res


def _run_jit(model: Callable, data: HierarchicalData, cfg: _Settings) -> tuple[MCMC, bool]:
    """One chain with a JIT-compiled potential; ``(mcmc, False)`` if compiling failed or looked unsafe.

    Tracing bakes Python control flow into the compiled function. A ``TracerWarning`` about converting a
    tensor to a Python value raised from user code (outside pyro, torch and ``amortize/data.py``) means the
    model may branch on a latent value, so the chain is rejected and the caller reruns it without JIT.
    Other warnings raised during the run are passed on.
    """
    kernel = NUTS(
        model,
        target_accept_prob=cfg.target_accept,
        max_tree_depth=cfg.max_tree_depth,
        jit_compile=True,
        ignore_jit_warnings=False,
    )
    mcmc = MCMC(kernel, cfg.num_samples, warmup_steps=cfg.num_warmup, disable_progbar=not cfg.progress)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mcmc.run(data)
    except Exception as e:  # noqa: BLE001 - a JIT failure of any kind falls back to eager mode
        logger.warning("run_nuts: JIT compilation failed (%s: %s); running without JIT", type(e).__name__, e)
        return mcmc, False
    safe = True
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            trusted = str(Path(w.filename).resolve()).startswith(_TRUSTED_PATHS)
            if safe and "to a Python" in str(w.message) and not trusted:
                logger.warning(
                    "run_nuts: the model converts a tensor to a Python value at %s:%s, which JIT tracing "
                    "would freeze; running without JIT",
                    w.filename,
                    w.lineno,
                )
                safe = False
        elif not (issubclass(w.category, DeprecationWarning) and "torch.jit" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return mcmc, safe


def _original_sites(
    model: Callable, data: HierarchicalData, draws: dict[str, torch.Tensor], latent: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Values of the original sites of a reparameterized model: replay it on the draws (vectorized if it can)."""
    n = next(iter(draws.values())).shape[0]
    missing = [name for name in latent if name not in draws]
    out = dict(draws)
    for parallel in (True, False):
        try:
            pred = Predictive(model, posterior_samples=draws, return_sites=missing, parallel=parallel)(data)
            break
        except Exception as e:  # noqa: BLE001 - a model that is not batch-safe is replayed draw by draw
            if not parallel:
                raise
            logger.debug("run_nuts: vectorized replay failed (%s); replaying draw by draw", e)
    for name in missing:
        out[name] = pred[name].reshape((n, *latent[name]))
    return out


def cached_nuts(
    model: Callable[[HierarchicalData], object],
    data: HierarchicalData,
    cache_dir: str | os.PathLike | None,
    run: bool = True,
    **kwargs,
) -> NUTSResult | None:
    """:func:`run_nuts`, reusing a result stored in ``cache_dir`` for the same model source, data and
    settings (``None``: no cache); see :func:`cached_reference`."""
    try:
        source = inspect.getsource(model)
    except (OSError, TypeError):
        source = getattr(model, "__qualname__", repr(model))
    return cached_reference(lambda: run_nuts(model, data, **kwargs), source, data, cache_dir, run, kwargs)


def cached_reference(
    compute: Callable[[], NUTSResult],
    source: str,
    data: HierarchicalData,
    cache_dir: str | os.PathLike | None,
    run: bool = True,
    settings: dict[str, Any] | None = None,
    cls: type[NUTSResult] = NUTSResult,
) -> NUTSResult | None:
    """``compute()`` (a reference run on ``data``), reused from ``cache_dir`` (``None``: no cache) under a key
    of ``source`` (model source or sampler name), the data and ``settings``; stored atomically with a
    checksum, rebuilt as ``cls``. ``run=False``: only a stored result, else None. A stored ``ok`` is
    decided again by :func:`checks_passed`, so entries written under an older rule meet the current one."""
    settings = dict(settings or {})
    if cache_dir is None:
        return compute()
    from ..checkpoint import load_checkpoint, payload_checksum, save_checkpoint
    from ..errors import CheckpointError

    key = payload_checksum(
        {
            "model": source,
            "y": data.y,
            "group": data.group,
            **({"rows": dict(data.row_index)} if data.crossed else {}),
            "parents": dict(data.parents),
            "covariates": {lvl: dict(cols) for lvl, cols in data.covariates.items()},
            "settings": sorted((k, v) for k, v in settings.items() if k != "progress"),
        }
    )[:24]
    path = Path(cache_dir) / f"nuts-{key}.pt"
    if path.exists():
        try:
            ck = load_checkpoint(path)
            res = cls(**{k: v for k, v in ck.items() if k != "format_version"})
            return _rejudged(res, settings.get("max_rhat", MAX_RHAT), settings.get("min_ess", MIN_ESS))
        except (CheckpointError, TypeError) as e:
            logger.warning("%s: unusable NUTS cache entry (%s); running NUTS again", path, e)
    if not run:
        return None
    res = compute()
    save_checkpoint(path, dict(vars(res)))
    return res


def _judge(res: NUTSResult, max_rhat: float, min_ess: float) -> bool:
    """Whether ``res`` passes :func:`checks_passed`; records the R-hat threshold of each site in ``res``."""
    chains = max(res.num_chains, 1)
    draws = next(iter(res.samples.values())).shape[0] // chains
    sizes = {name: math.prod(v.shape[1:]) for name, v in res.samples.items()}
    res.r_hat_threshold = rhat_thresholds(sizes, chains, draws, max_rhat)
    return checks_passed(
        res.r_hat,
        res.ess_bulk,
        res.divergences,
        num_elements=sizes,
        num_chains=chains,
        num_draws=draws,
        max_rhat=max_rhat,
        min_ess=min_ess,
    )


def _rejudged(res: NUTSResult, max_rhat: float, min_ess: float) -> NUTSResult:
    """``res`` with ``ok`` decided by :func:`checks_passed` (site sizes and draws per chain from its samples)."""
    if not res.samples:
        return res
    ok = _judge(res, max_rhat, min_ess)
    if ok != res.ok:
        logger.info("cached NUTS result: ok %s -> %s under the current checks (%s)", res.ok, ok, res.summary())
        res.ok = ok
    return res
