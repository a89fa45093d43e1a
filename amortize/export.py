"""ArviZ InferenceData and the summary table of one dataset's posterior.

:func:`inference_data` writes every group a Bayesian workflow reads: ``posterior`` (dims named after
the levels, coords the data's group labels), ``sample_stats`` (each draw's log importance weight and
log q; Pareto k, importance ESS and the trust decision as attributes), ``observed_data``,
``log_likelihood`` (per row, so ``az.loo`` works), ``posterior_predictive`` (the model run on the
same draws, so ``az.plot_ppc`` works) and ``constant_data`` (covariates and group indices).
``az.summary`` on draws from q reports an ESS near the number of draws whatever q's fit: the
importance ESS in ``sample_stats.attrs`` is the one that says how far the draws can be trusted.

:func:`summary_frame` is the table of ``Posterior.summary``: ArviZ's ``az.summary`` layout (mean, sd,
a central interval, mcse, ess) with the importance ESS in place of the chains' ESS, and z against a
reference when one is given.

:func:`write_draws` writes one dataset's draws as a file: ArviZ NetCDF (the full InferenceData, the
diagnostics in ``sample_stats`` attributes) or CSV (one row per draw; the diagnostics in
``NAME.diagnostics.json`` beside it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro import poutine

from .checkpoint import write_text
from .errors import DataError
from .files import make_dirs, remove_empty, write_json
from .importance import K_THRESHOLD, psis
from .plates import batched
from .values import OBS

if TYPE_CHECKING:
    from .posterior import Posterior

__all__ = [
    "inference_data",
    "summary",
    "summary_frame",
    "element_labels",
    "reasons",
    "trust",
    "log_density",
    "draws_csv",
    "write_draws",
]

CHUNK_ELEMENTS = 2**22  # draws x rows traced at once for the log likelihood


def reasons(pareto_k: float, flags: Sequence[str], streamed: bool = False) -> list[str]:
    """Why draws are not to be trusted (empty: they are): k > 0.7 or NaN, data outside the training range."""
    out = []
    if math.isnan(pareto_k) and not streamed:
        out.append("Pareto k is NaN (too few finite importance weights to judge)")
    elif pareto_k > K_THRESHOLD:
        out.append(f"Pareto k {pareto_k:.2f} > {K_THRESHOLD}")
    return out + [f"outside the training range: {f}" for f in flags]


def trust(draws: Any, pareto_k: float, ess: float, flags: Sequence[str], num_proposals: int) -> dict[str, Any]:
    """The trust decision of a set of draws: ``{"pareto_k", "ess", "num_proposals", "corrected", "ok",
    "reason"}``; ``ok`` is False when k > 0.7 (or NaN) or the data lie outside the training range."""
    why = reasons(pareto_k, flags)
    return {
        "pareto_k": float(pareto_k),
        "ess": float(ess),
        "num_proposals": int(num_proposals),
        "corrected": bool(getattr(draws, "corrected", False)),
        "ok": not why,
        "reason": "; ".join(why) or "ok",
    }


@torch.no_grad()
def log_density(post: Posterior, draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(y, z) [n], log p(y_i | z) [n, N])`` of one dataset's draws ``{site: [n, *shape]}``:
    the model conditioned on each draw, scored by Pyro's ``compute_log_prob`` (masks and scales honoured)."""
    part = post.parts[0][1]
    st, data = post.structure, part.data
    fn = batched(post.model, st.max_plate_nesting)
    n = next(iter(draws.values())).shape[0]
    chunk = max(1, CHUNK_ELEMENTS // max(1, data.n_obs))
    joint, rows = [], []
    for start in range(0, n, chunk):
        values = {s.name: st.from_user(s, draws[s.name][start : start + chunk].unsqueeze(1)) for s in st.latents}
        m = next(iter(values.values())).shape[0]
        tr = poutine.trace(poutine.condition(fn, data=values)).get_trace(data, m, 1)
        tr.compute_log_prob()
        total = torch.zeros(m, dtype=torch.float64, device=data.y.device)
        for site in tr.nodes.values():
            if site["type"] == "sample" and "log_prob" in site:
                lp = site["log_prob"]
                total = total + (lp.reshape(lp.shape[0], -1).sum(-1) if lp.dim() else lp).double()
        resp = tr.nodes[st.response]["log_prob"]  # [m, 1, ..., N]
        rows.append(resp.expand(m, *resp.shape[1:]).reshape(m, data.n_obs))
        joint.append(total)
    return torch.cat(joint), torch.cat(rows)


def _event_dims(site: str, rank: int) -> list[str]:
    """Default names of a site's event dims: ``<site>_element`` (a vector), ``<site>_row``, ``<site>_col``
    (a matrix, e.g. a Cholesky factor), ``<site>_dim_<i>`` beyond."""
    if rank == 1:
        return [f"{site}_element"]
    if rank == 2:
        return [f"{site}_row", f"{site}_col"]
    return [f"{site}_dim_{i}" for i in range(rank)]


def _dims(post: Posterior, dims: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Per site: its level (if any), then its event dims: the user's names, else :func:`_event_dims`."""
    out = {}
    for s in post.structure.latents:
        event = list((dims or {}).get(s.name, _event_dims(s.name, len(s.event_shape))))
        if len(event) != len(s.event_shape):
            raise DataError(f"to_arviz: dims for site '{s.name}' name {len(event)} dims, its event has {s.event_shape}")
        out[s.name] = ([s.level] if s.level else []) + event
    return out


def _labels(data: Any, level: str) -> list[Any]:
    return list(data.labels.get(level, range(data.size(level))))


def inference_data(
    post: Posterior,
    num_samples: int = 1000,
    seed: int | None = None,
    correct: bool = False,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
) -> Any:
    """A full ArviZ InferenceData of one dataset's posterior (see the module docstring).

    Args:
        post: a posterior of one dataset (not streamed).
        num_samples: draws (one chain).
        seed: seeds the draws and the posterior predictive.
        correct: PSIS-resampled draws (``Posterior.sample(correct=True)``); k and ESS are then those of
            the proposals.
        dims: event dims per site, e.g. ``{"beta": ["coef"]}`` (default ``beta_element``; a matrix site
            ``<site>_row``, ``<site>_col``).
        coords: coordinates of those event dims, e.g. ``{"coef": ["intercept", "slope"]}``.

    Raises:
        ImportError: ArviZ is not installed.
        DataError: a batch, a list or a streamed dataset; dims that do not fit a site.
    """
    try:
        import arviz as az
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("to_arviz needs ArviZ: pip install 'amortize[arviz]'") from e
    if post.layout != "single" or post.streamed is not None:
        raise DataError("to_arviz takes one (not streamed) dataset; index the list (post[i]) or the batch first")
    seed = post._next_seed() if seed is None else int(seed)
    draws = post.sample(num_samples, seed, correct=correct)
    log_joint, log_lik = log_density(post, draws)
    log_q = post.log_prob(dict(draws)).double()
    lw = log_joint - log_q
    if correct:
        k, ess, num = draws.pareto_k, draws.ess, draws.num_proposals
    else:
        res = psis(lw)
        k, ess, num = res.k, res.ess, int(num_samples)
    decision = trust(draws, k, ess, post.range_flags(), num)
    with post._seeded(seed + 1):
        y_rep = post.parts[0][1].predictive({k_: v.unsqueeze(1) for k_, v in draws.items()})[:, 0]
    data = post.data
    response = data.response
    all_dims = _dims(post, dims)
    all_coords: dict[str, Any] = {lvl: _labels(data, lvl) for lvl in data.levels}
    all_coords[OBS] = list(range(data.n_obs))
    all_coords.update(dict(coords or {}))

    def np1(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().double().numpy()[None]  # one chain: [1, n, ...]

    constant: dict[str, np.ndarray] = {}
    const_dims: dict[str, list[str]] = {}
    for name, lvl in data.covariate_level.items():
        constant[name], const_dims[name] = data.x[name].cpu().numpy(), [lvl]
    for lvl in data.levels:
        constant[f"{lvl}_index"], const_dims[f"{lvl}_index"] = data.index(lvl).cpu().numpy(), [OBS]
        if lvl in data.parents:  # each group's parent: an index into the level above's coords
            constant[f"{lvl}_parent"], const_dims[f"{lvl}_parent"] = data.parents[lvl].cpu().numpy(), [lvl]
    attrs = {
        "inference_library": "amortize",
        "pareto_k": decision["pareto_k"],
        "importance_ess": decision["ess"],
        "num_proposals": decision["num_proposals"],
        "corrected": int(decision["corrected"]),
        "ok": int(decision["ok"]),
        "reason": decision["reason"],
        "seed": seed,
    }
    idata = az.from_dict(
        posterior={k_: np1(v) for k_, v in draws.items()},
        sample_stats={"log_importance_weight": np1(lw), "log_q": np1(log_q)},
        log_likelihood={response: np1(log_lik)},
        posterior_predictive={response: np1(y_rep)},
        observed_data={response: data.y.cpu().double().numpy()},
        constant_data=constant,
        dims={**all_dims, response: [OBS], **const_dims},
        coords=all_coords,
    )
    for group in ("posterior", "sample_stats"):  # where a reader of the draws looks for the warning
        idata[group].attrs.update(attrs)
    return idata


def element_labels(name: str, shape: Sequence[int], level: str | None, data: Any) -> list[str]:
    """Row labels of a site's elements: ``mu``, ``theta[a]``, ``beta[0]``, ``theta[a, 1]``."""
    if not shape:
        return [name]
    groups = _labels(data, level) if level else None
    out = []
    for idx in np.ndindex(*shape):
        parts = [str(groups[idx[0]]), *map(str, idx[1:])] if groups is not None else list(map(str, idx))
        out.append(f"{name}[{', '.join(parts)}]")
    return out


def _as_draws(reference: Any) -> dict[str, np.ndarray]:
    """Reference draws ``{site: [S, *shape]}`` from a dict (tensors or arrays) or an InferenceData."""
    if hasattr(reference, "posterior"):  # an ArviZ InferenceData: chains stacked
        ds = reference.posterior
        return {k: ds[k].values.reshape((-1,) + ds[k].shape[2:]) for k in ds.data_vars}
    return {
        k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=float) for k, v in reference.items()
    }


def summary_frame(
    draws: dict[str, torch.Tensor], data: Any, structure: Any, ess: float, prob: float = 0.9, reference: Any = None
) -> Any:
    """One dataset's table in ``az.summary`` layout: mean, sd, the central ``prob`` interval, mcse of the
    mean and sd, ``ess`` (the importance ESS of the draws), and with ``reference`` draws (a dict of
    ``[S, *shape]`` or an InferenceData) their mean and sd and ``z = (mean - ref_mean) / ref_sd``."""
    import pandas as pd

    lo_q, hi_q = (1 - prob) / 2, 1 - (1 - prob) / 2
    ref = _as_draws(reference) if reference is not None else {}
    rows, index = [], []
    for name, v in draws.items():
        x = v.detach().cpu().double().numpy()
        flat = x.reshape(x.shape[0], -1)
        labels = element_labels(name, x.shape[1:], structure[name].level, data)
        r = ref[name].reshape(ref[name].shape[0], -1) if name in ref else None
        if r is not None and r.shape[1] != flat.shape[1]:
            raise DataError(
                f"summary: reference draws of site '{name}' have {r.shape[1]} elements, not {flat.shape[1]}"
            )
        mean, sd = flat.mean(0), flat.std(0, ddof=1)
        lo, hi = np.quantile(flat, [lo_q, hi_q], axis=0)
        e = ess if math.isfinite(ess) and ess > 0 else float("nan")
        for j, label in enumerate(labels):
            row = {
                "mean": mean[j],
                "sd": sd[j],
                f"{lo_q:.0%}": lo[j],
                f"{hi_q:.0%}": hi[j],
                "mcse_mean": sd[j] / math.sqrt(e),
                "mcse_sd": sd[j] / math.sqrt(2 * e),
                "ess": e,
            }
            if ref:
                rm, rs = (r[:, j].mean(), r[:, j].std(ddof=1)) if r is not None else (np.nan, np.nan)
                row.update(ref_mean=rm, ref_sd=rs, z=(mean[j] - rm) / rs)
            rows.append(row)
            index.append(label)
    return pd.DataFrame(rows, index=index)


def summary(post: Posterior, num_samples: int, seed: int | None, prob: float, reference: Any, correct: bool) -> Any:
    """``Posterior.summary``: one :func:`summary_frame` per dataset, Pareto k, ESS, ``ok`` and ``reason``
    in ``frame.attrs`` (one dataset) or a ``(dataset, row)`` index (a batch or a list)."""
    import pandas as pd

    seed = post._next_seed() if seed is None else int(seed)
    draws = post.sample(num_samples, seed, correct=correct)
    diag = post.diagnostics(num_samples, seed)
    if post.layout == "single":
        frame = summary_frame(draws, post.data, post.structure, _ess(draws, diag), prob, reference)
        frame.attrs.update({k: diag[k] for k in ("pareto_k", "ess", "ok", "reason")})
        return frame
    if post.layout == "batch":
        one = [{k: v[:, b] for k, v in draws.items()} for b in range(post.batch_size or 1)]
        ess = draws.ess if isinstance(getattr(draws, "ess", None), list) else diag["ess"]
        data, diags = [post.data] * len(one), [{**diag, "ess": e} for e in ess]
        refs = reference if isinstance(reference, (list, tuple)) else [reference] * len(one)
    else:
        one, data, diags = draws, post.datasets, diag
        refs = reference if isinstance(reference, (list, tuple)) else [reference] * len(one)
    frames = [summary_frame(d, x, post.structure, _ess(d, g), prob, r) for d, x, g, r in zip(one, data, diags, refs)]
    return pd.concat(frames, keys=range(len(frames)), names=["dataset", None])


def _ess(draws: Any, diag: dict[str, Any]) -> float:
    """The ESS a summary's mcse uses: of the corrected draws' weights, else of the diagnostics' weights."""
    ess = getattr(draws, "ess", None)
    return float(ess if ess is not None and not isinstance(ess, list) else diag["ess"])


def draws_csv(draws: Mapping[str, torch.Tensor]) -> str:
    """One row per draw, one column per site element: ``mu``, ``theta[3]``, ``beta[1,2]``."""
    names, cols = ["draw"], []
    n = next(iter(draws.values())).shape[0]
    for site, v in draws.items():
        flat = v.reshape(n, -1).double().cpu().numpy()
        shape = tuple(v.shape[1:])
        names += [site] if not shape else [f"{site}[{','.join(map(str, i))}]" for i in np.ndindex(*shape)]
        cols.append(flat)
    table = np.concatenate([np.arange(n)[:, None].astype(float)] + cols, axis=1)
    lines = [",".join(f'"{c}"' if "," in c else c for c in names)]
    lines += [f"{int(row[0])}," + ",".join(f"{x:.9g}" for x in row[1:]) for row in table]
    return "\n".join(lines) + "\n"


def write_draws(
    post: Posterior,
    path: str | os.PathLike,
    num_samples: int,
    seed: int,
    correct: bool = False,
    record: Mapping[str, Any] | None = None,
    draws: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``num_samples`` draws of ``post`` to ``path``, atomically: ``.nc``, the full InferenceData with
    ``record`` (the diagnostics: pooled Pareto k, its sets, the decision) in ``sample_stats`` attributes as
    ``diagnostics_*``; any other name, CSV of ``draws`` (else fresh draws), ``record`` as ``NAME.diagnostics.json``.

    Raises:
        OSError: a write failed (disk full): names the file, and leaves neither a temporary file nor the
            folders made for it.
    """
    path = Path(path)
    if path.suffix != ".nc":
        made = make_dirs(path.parent, exist_ok=True)
        try:
            write_text(path, draws_csv(draws if draws is not None else post.sample(num_samples, seed)))
            write_json(path.with_suffix(".diagnostics.json"), dict(record or {}))
        except OSError:
            remove_empty(made)
            raise
        return path
    idata = post.to_arviz(num_samples, seed, correct=correct)
    for key, value in (record or {}).items():
        if isinstance(value, bool):
            value = int(value)  # NetCDF attributes hold numbers, strings and lists of them
        if isinstance(value, list):
            value = [v for v in value if isinstance(v, (int, float))] if key != "flags" else "; ".join(value)
        if isinstance(value, dict):
            value = json.dumps(value)  # per-level k: a JSON string
        if value is not None:
            idata.sample_stats.attrs[f"diagnostics_{key}"] = value
    made = make_dirs(path.parent, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        idata.to_netcdf(str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
        if not path.exists():
            remove_empty(made)
    return path
