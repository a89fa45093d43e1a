"""The per-dataset verdict behind ``Posterior.diagnostics()``: hierarchical k, range flags, the model check.

Per dataset (see :mod:`amortize.hierarchical_is`):

* ``pareto_k``: the globals' Pareto k of their pseudo-marginal weights (``pareto_k_sets``: one per
  repeat, the Monte Carlo spread; the pooled value decides), with its importance ``ess``;
* ``shift``: the global element whose importance-weighted mean lies farthest from q's, in weighted sds
  (``z``, an estimate of q's error against the posterior; its Monte Carlo ``se``, ``sd_ratio`` q's sd
  over the weighted one, ``site``: :func:`amortize.shift.weighted_shift`);
* ``levels``: per level with latent sites, the per-group k's worst and p90 (``k_worst``, ``k_p90``),
  the sites and the number of groups;
* ``group_draws``, ``noise_sd``: draws per outermost group behind the globals' weights (4, raised until
  their noise is below 0.5, or 256 draws) and the sd of that noise;
* ``flags``: data outside the training range;
* ``local_sbc``: posterior SBC conditional on this dataset (:mod:`amortize.local_sbc`): per quantity
  its p-value, shift and whether its rank ECDF lies inside the band, the family-wise ``ok`` (None when
  skipped), its ``reason``, R and L. Reported, not deciding: at R = 200 its band fails shifts of 0.2 q
  sds at augmented datasets, where an amortized q's error differs from its error at y, and on the
  held-out benchmark (experiments/bench/verdict.py) it failed 11 of 12 posteriors that agree with NUTS;
* ``model_check``: the default posterior predictive statistics (:func:`amortize.predictive.misfit`) with
  p below 0.001 or above 0.999 over 1000 replicated datasets (the first 200 where they settle it,
  :func:`fit_checks`), from the globals' held draws of q: data the model cannot have generated
  (heavy tails under a Normal likelihood), a misfit no q can mend, reported apart from q's errors;
* ``ok`` is True when the globals' k <= 0.7, their importance ESS is at least 50% of the draws
  (``ess_ratio``; a q much wider than the posterior has a small k but a small ESS) and their shift is at
  most 0.5 sd (a q off by 0.5-0.8 sd keeps an ESS above 50%), every level's p90 k <= 0.7, the model check
  passed and no flag is raised; ``reason`` says why not and ``failed`` names the criteria that said no
  (:data:`CRITERIA`: ``k``, ``ess``, ``shift``, ``groups``, ``model``, ``range``; ``finite`` for draws
  that are not finite; the local SBC, which does not decide, is never among them). ``correctable``: the
  k's and flags alone (without the ESS and shift conditions, which judge the uncorrected q), i.e. the
  corrected draws (``sample(n, correct=True)``) can be trusted.

A dataset streamed in several chunks is not judged (``ok`` None, False with a flag): its weights are
not computed. One that fits in one chunk is weighed whole, with a subsampled fit's q(globals).

A model without global latents, or of crossed factors, is judged by the joint k (:func:`joint_diagnose`).
The local SBC runs on its own seed (from ``seed``), so switching it off leaves every k as it was.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .export import reasons
from .hierarchical_is import hierarchical_weights
from .importance import K_THRESHOLD, psis
from .local_sbc import LocalSBC, local_sbc, skipped
from .plates import seeded
from .predictive import MISFIT_DRAWS, MISFIT_FIRST, misfit, misfit_reasons
from .shift import Q_GLOBAL_DRAWS, q_global_draws, weighted_shift

if TYPE_CHECKING:
    from .posterior import Posterior

__all__ = [
    "ESS_RATIO_MIN",
    "SHIFT_MAX",
    "CRITERIA",
    "verdict",
    "diagnose",
    "joint_diagnose",
    "level_reasons",
    "globals_proposals",
    "local_checks",
    "fit_checks",
]

log = logging.getLogger("amortize.posterior")

# The globals' importance ESS per draw below which q is too wide or off to use uncorrected. For a
# Gaussian q shifted by d posterior sds the ratio is exp(-d^2) (exp(-sum d_i^2) over dimensions): 0.5
# is a shift of about 0.8 sd, where a good q (z <= 0.3, ratio >= 0.91 per site) keeps a margin for the
# noise of the per-group evidence estimates (noise_sd <= 0.5 costs at most a factor exp(-0.25)).
# Measured on held-out datasets vs NUTS (experiments/bench/verdict.py): good posteriors 0.69-0.95.
ESS_RATIO_MIN = 0.5
# The largest shift of a global's importance-weighted posterior mean from q's mean, in weighted posterior
# sds (the benchmarks' z, estimated from the weights alone), at which q is still used uncorrected: the
# verdict bench calls a posterior bad above 0.5 sd and good at most 0.3 sd from NUTS.
SHIFT_MAX = 0.5
# The names ``failed`` lists, in this order: the globals' k, their ESS ratio, their weighted shift, a
# level's p90 k, the model check, a range flag, draws that are not finite.
CRITERIA = ("k", "ess", "shift", "groups", "model", "range", "finite")
_PER_DATASET = (
    "pareto_k",
    "pareto_k_sets",
    "ess",
    "ess_ratio",
    "shift",
    "correctable",
    "failed",
    "levels",
    "local_sbc",
    "model_check",
)


def verdict(
    post: Posterior, num_samples: int, seed: int | None, repeats: int, local_sbc: bool | LocalSBC, model_check: bool
) -> Any:
    """``Posterior.diagnostics``: the verdict in the layout of the input (one dict, lists per dataset
    for a batch, a list of dicts for a list)."""
    settings = LocalSBC() if local_sbc is True else (local_sbc or None)
    if settings is not None and not isinstance(settings, LocalSBC):
        raise TypeError(f"diagnostics: local_sbc must be a bool or a LocalSBC, got {type(local_sbc).__name__}")
    flags = post.range_flags()
    if post.streamed is not None:  # several chunks: no weights, no replicates; only the flags can judge
        nan, why = float("nan"), reasons(float("nan"), flags, streamed=True)
        chunks = post.streamed.num_chunks
        why = why or [f"not judged: the weights of a dataset streamed in {chunks} chunks are not computed"]
        ok = False if flags else None
        out = dict(pareto_k=nan, pareto_k_sets=[], ess=nan, num_samples=0, flags=flags, ok=ok, reason="; ".join(why))
        out["failed"] = ["range"] if flags else []
        if settings is not None:
            out["local_sbc"] = skipped("streamed: the replicates need the whole dataset at once", settings)
        return out
    if not post.structure.global_sites or post.structure.crossed:  # crossed: no group's rows are its own
        return joint_diagnose(post, num_samples, seed, repeats, flags, settings, model_check)
    per = diagnose(post, num_samples, seed, repeats, flags, settings, model_check)
    if post.layout == "list":
        return per
    if post.layout == "single":
        return per[0]
    out = {k: [d[k] for d in per] for k in _PER_DATASET if k in per[0]}
    bad = [f"dataset {j}: {d['reason']}" for j, d in enumerate(per) if not d["ok"]]
    out.update(num_samples=per[0]["num_samples"], group_draws=per[0]["group_draws"], flags=flags)
    return {**out, "ok": not bad, "reason": "; ".join(bad) or "ok"}


def unusable(post: Posterior, why: str) -> Any:
    """The verdict of a posterior whose draws are not finite (q proposes values beyond floating point, a
    NaN inside the guide): not ok, not correctable, k infinite, ``why`` the reason; in the input's layout."""
    flags = post.range_flags()
    one = dict(pareto_k=math.inf, pareto_k_sets=[math.inf], ess=0.0, num_samples=0, ok=False, correctable=False)
    reason = f"q's draws are not finite ({why}): the posterior cannot be used"
    if post.layout == "list":
        return [
            {**one, "failed": _failed(finite=False, flags=f), "flags": f, "reason": "; ".join([reason, *f])}
            for f in flags
        ]
    failed = _failed(finite=False, flags=flags)
    if post.layout == "batch":
        B = post.parts[0][1].data.batch_size or 1
        one = {k: [v] * B if k in _PER_DATASET else v for k, v in one.items()}
        failed = [failed] * B
    return {**one, "failed": failed, "flags": flags, "reason": "; ".join([reason, *flags])}


def _failed(
    k: float = 0.0,
    ess_ratio: float = 1.0,
    shift: float = 0.0,
    levels: dict[str, dict[str, Any]] | None = None,
    fit: dict[str, Any] | None = None,
    flags: Any = (),
    finite: bool = True,
) -> list[str]:
    """The :data:`CRITERIA` a dataset fails: the ESS and shift judge only where the globals' k is usable."""
    usable = k <= K_THRESHOLD
    out = {
        "k": not usable,
        "ess": usable and ess_ratio < ESS_RATIO_MIN,
        "shift": usable and shift > SHIFT_MAX,
        "groups": bool(level_reasons(levels or {})),
        "model": fit is not None and not fit["ok"],
        "range": bool(flags),
        "finite": not finite,
    }
    return [c for c in CRITERIA if out[c]]


def globals_proposals(num_samples: int) -> int:
    """Global draws the verdict weighs for a budget of ``num_samples``: a quarter (each carries
    :data:`~amortize.hierarchical_is.WEIGHT_DRAWS` draws of every outermost group, the first
    :data:`~amortize.hierarchical_is.PARENT_DRAWS_FOR_K` :data:`~amortize.hierarchical_is.GROUP_DRAWS` of
    every group of a level), at least 100 (a PSIS tail of 30)."""
    return max(100, int(num_samples) // 4)


def level_reasons(levels: dict[str, dict[str, Any]]) -> list[str]:
    """Why the groups of a level are not to be trusted: their p90 per-group k above 0.7 (or NaN)."""
    out = []
    for lvl, v in levels.items():
        p90 = v["k_p90"]
        if math.isnan(p90) or p90 > K_THRESHOLD:
            out.append(
                f"level '{lvl}' ({', '.join(v['sites'])}): p90 of the per-group Pareto k {p90:.2f} > {K_THRESHOLD}"
            )
    return out


def local_checks(post: Posterior, settings: LocalSBC | None, seed: int) -> list[dict[str, Any] | None]:
    """The local SBC of every dataset in input order (None each when ``settings`` is None), on streams
    of its own derived from ``seed`` (the verdict's k's do not move with it)."""
    total = sum(len(m) for m, _ in post.parts)
    if settings is None:
        return [None] * total
    out: list[dict[str, Any] | None] = [None] * total
    for p, (members, part) in enumerate(post.parts):
        for j, res in enumerate(local_sbc(part, settings, post.ranges, seed + p, post.device)):
            out[members[j]] = res
    return out


@torch.no_grad()
def fit_checks(
    post: Posterior, enabled: bool, seed: int, held: list[dict[str, torch.Tensor]] | None = None
) -> list[dict[str, Any] | None]:
    """The model check (:func:`amortize.predictive.misfit`) of every dataset in input order (None each
    when not ``enabled``), on :data:`~amortize.predictive.MISFIT_DRAWS` replicated datasets drawn on
    streams of their own derived from ``seed``: from ``held`` (each part's independent joint draws of q,
    user layout ``[S, B, ...]``, those the globals' weights hold: ``ceil(MISFIT_DRAWS / S)`` replicates
    each, so that the check draws nothing from q), else from as many fresh draws of q."""
    out: list[dict[str, Any] | None] = [None] * sum(len(m) for m, _ in post.parts)
    if not enabled:
        return out
    for p, (members, part) in enumerate(post.parts):
        d = part.data
        datasets = [d] if d.batch_size is None else [d.with_response(y) for y in d.y]
        with seeded(int(np.random.default_rng([int(seed) % 2**63, 30, p]).integers(2**62)), post.device):
            if held is None:
                values = part.draws(MISFIT_DRAWS)[0]
            else:
                reps = -(-MISFIT_DRAWS // next(iter(held[p].values())).shape[0])
                values = {k: v.repeat_interleave(reps, 0)[:MISFIT_DRAWS] for k, v in held[p].items()}
            # the first MISFIT_FIRST replicates, then the rest only where those leave the check open
            y_rep = part.predictive({k: v[:MISFIT_FIRST] for k, v in values.items()})  # [n, B, N]
            res = [misfit(d, y_rep[:, j], total=MISFIT_DRAWS) for j, d in enumerate(datasets)]
            if any(r is None for r in res):
                y_rep = torch.cat([y_rep, part.predictive({k: v[MISFIT_FIRST:] for k, v in values.items()})])
                res = [r if r is not None else misfit(d, y_rep[:, j]) for j, (r, d) in enumerate(zip(res, datasets))]
        for j, i in enumerate(members):
            out[i] = res[j]
    return out


@torch.no_grad()
def diagnose(
    post: Posterior,
    num_samples: int,
    seed: int | None,
    repeats: int,
    flags: Any,
    local: LocalSBC | None = None,
    model_check: bool = True,
) -> list[dict[str, Any]]:
    """One verdict dict per dataset in input order (module docstring), for a not streamed posterior."""
    S = globals_proposals(num_samples)
    repeats = max(1, int(repeats))
    total = sum(len(m) for m, _ in post.parts)
    out: list[dict[str, Any]] = [{} for _ in range(total)]
    seed = post._next_seed() if seed is None else int(seed)  # what _seeded(None) would take: the k's as before
    local_res = local_checks(post, local, seed)
    encodings = [part.encode() for _, part in post.parts]  # one encoding per part serves every pass
    glob_sites = [s.name for s in post.structure.global_sites]
    with post._seeded(seed):
        weights = [
            [hierarchical_weights(part, S, encoded=e) for _ in range(repeats)]
            for (_, part), e in zip(post.parts, encodings)
        ]
        # the model check replicates from the draws the first set holds (independent joint draws of q)
        fit_res = fit_checks(post, model_check, seed, [sets[0].globals_draws for sets in weights])
        for (members, part), encoded, sets in zip(post.parts, encodings, weights):
            q_glob = q_global_draws(part, encoded, Q_GLOBAL_DRAWS)  # E_q for the shift
            pooled = torch.cat([hw.global_log_weights for hw in sets])
            for j, i in enumerate(members):
                res = psis(pooled[:, j])
                ks = [psis(hw.global_log_weights[:, j]).k for hw in sets] if repeats > 1 else [res.k]
                levels = {}
                for lvl in sets[0].levels:
                    worst = max(hw.levels[lvl].k_worst[j] for hw in sets)
                    p90 = max(hw.levels[lvl].k_p90[j] for hw in sets)
                    sites = sets[0].levels[lvl].sites
                    levels[lvl] = {"sites": sites, "k_worst": worst, "k_p90": p90, "groups": part.data.size(lvl)}
                f = flags[i] if post.layout == "list" else flags
                if post.layout == "batch":
                    f = [x for x in f if not x.startswith("dataset ")] + [
                        x.split(": ", 1)[1] for x in f if x.startswith(f"dataset {j}: ")
                    ]
                ratio = res.ess / max(1, pooled.shape[0])
                drawn = {s: torch.cat([hw.globals_draws[s][:, j] for hw in sets]) for s in glob_sites}
                shift = weighted_shift(drawn, res.log_weights, {k: v[:, j] for k, v in q_glob.items()})
                why = [f"globals' {r}" for r in reasons(res.k, [])] + level_reasons(levels) + reasons(0.0, f)
                correctable = not why
                if res.k <= K_THRESHOLD and shift["z"] > SHIFT_MAX:
                    why.insert(
                        0,
                        f"globals' importance-weighted mean of '{shift['site']}' lies {shift['z']:.2f} posterior sds"
                        f" (se {shift['se']:.2f}) from q's > {SHIFT_MAX}: q is off (sample(correct=True) applies)",
                    )
                if res.k <= K_THRESHOLD and ratio < ESS_RATIO_MIN:
                    why.insert(
                        0,
                        f"globals' importance ESS {ratio:.0%} of the draws < {ESS_RATIO_MIN:.0%}: q is too"
                        " wide or off (sample(correct=True) applies)",
                    )
                if fit_res[i] is not None:
                    why += misfit_reasons(fit_res[i])
                if why:
                    log.warning("posterior may not be trustworthy: %s", "; ".join(why))
                out[i] = {
                    "pareto_k": res.k,
                    "pareto_k_sets": ks,
                    "ess": res.ess,
                    "ess_ratio": ratio,
                    "shift": shift,
                    "correctable": correctable,
                    "failed": _failed(res.k, ratio, shift["z"], levels, fit_res[i], f),
                    "levels": levels,
                    "num_samples": S * repeats,
                    "group_draws": max(hw.group_draws for hw in sets),
                    "noise_sd": max(float(hw.noise_sd[j]) for hw in sets if hw.noise_sd is not None),
                    "flags": f,
                    "ok": not why,
                    "reason": "; ".join(why) or "ok",
                }
                if local_res[i] is not None:
                    out[i]["local_sbc"] = local_res[i]
                if fit_res[i] is not None:
                    out[i]["model_check"] = fit_res[i]
    return out


def joint_diagnose(
    post: Posterior,
    num_samples: int,
    seed: int | None,
    repeats: int,
    flags: Any,
    local: LocalSBC | None = None,
    model_check: bool = True,
) -> Any:
    """A model without global latents, or of crossed factors (whose groups share rows, so that no
    per-group weight exists): the Pareto k of the joint weights p(y, z) / q(z | y), the model check and
    the local SBC (reported), in the layout of ``Posterior.diagnostics``."""
    repeats = max(1, int(repeats))
    seed = post._next_seed() if seed is None else int(seed)
    with post._seeded(seed):
        sets = [[lw for _, lw in post.proposals(num_samples)] for _ in range(repeats)]  # [repeat][part] [n, B]
    local_res = local_checks(post, local, seed)
    fit_res = fit_checks(post, model_check, seed)
    per: list[tuple[float, float, list[float]]] = [(0.0, 0.0, [])] * sum(len(m) for m, _ in post.parts)
    for p, (members, _) in enumerate(post.parts):
        pooled = torch.cat([one[p] for one in sets])
        for j, i in enumerate(members):
            res = psis(pooled[:, j])
            ks = [psis(one[p][:, j]).k for one in sets] if repeats > 1 else [res.k]
            per[i] = (res.k, res.ess, ks)
    total = repeats * int(num_samples)
    if post.layout == "list":
        return [_verdict([per[i]], flags[i], total, [local_res[i]], [fit_res[i]]) for i in range(len(post.datasets))]
    return _verdict(per, flags, total, local_res, fit_res, batch=post.layout == "batch")


def _verdict(
    per: list[tuple[float, float, list[float]]],
    flags: list[str],
    num_samples: int,
    local: list[dict[str, Any] | None],
    fit: list[dict[str, Any] | None],
    batch: bool = False,
) -> dict[str, Any]:
    ks, ess, sets = [k for k, _, _ in per], [e for _, e, _ in per], [s for _, _, s in per]
    worst = max((k for k in ks if not math.isnan(k)), default=float("nan"))
    why = reasons(worst, flags)
    for j, res in enumerate(fit):
        why += [f"dataset {j}: {r}" if batch else r for r in (misfit_reasons(res) if res else [])]
    if why:
        log.warning("posterior may not be trustworthy: %s", "; ".join(why))
    out = {
        "pareto_k": ks if batch else ks[0],
        "pareto_k_sets": sets if batch else sets[0],
        "ess": ess if batch else ess[0],
        "num_samples": num_samples,
        "flags": flags,
        "failed": _joint_failed(worst, fit, flags),
        "ok": not why,
        "reason": "; ".join(why) or "ok",
    }
    if local[0] is not None:
        out["local_sbc"] = local if batch else local[0]
    if fit[0] is not None:
        out["model_check"] = fit if batch else fit[0]
    return out


def _joint_failed(k: float, fit: list[dict[str, Any] | None], flags: list[str]) -> list[str]:
    """The :data:`CRITERIA` the joint verdict of one dataset or a batch fails (the worst of its k's)."""
    misfit_any = any(r is not None and not r["ok"] for r in fit)
    return _failed(k, flags=flags, fit={"ok": False} if misfit_any else None)
