"""The per-dataset verdict behind ``Posterior.diagnostics()``: hierarchical k, the joint k, range flags.

Per dataset (see :mod:`amortize.hierarchical_is`):

* ``pareto_k``: the globals' Pareto k of their pseudo-marginal weights (``pareto_k_sets``: one per
  repeat, the Monte Carlo spread; the pooled value decides), with its importance ``ess``;
* ``levels``: per level with latent sites, the per-group k's worst and p90 (``k_worst``, ``k_p90``),
  the sites and the number of groups;
* ``group_draws``, ``noise_sd``: draws per outermost group behind the globals' weights and the sd of
  their noise (raised until it is below 0.5, or 256 draws);
* ``joint_pareto_k``: the k of the joint weights over every latent (reported, not deciding: it
  degenerates with the number of groups even for a good q);
* ``flags``: data outside the training range;
* ``ok`` is True when the globals' k <= 0.7 and their importance ESS is at least 30% of the draws
  (``ess_ratio``; a q much wider than the posterior has a small k but a small ESS), every level's p90
  k <= 0.7 and no flag is raised; ``reason`` says why not. ``correctable``: the same without the ESS
  condition, i.e. the corrected draws (``sample(n, correct=True)``) can be trusted.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from .export import reasons
from .hierarchical_is import GROUP_DRAWS, hierarchical_weights
from .importance import K_THRESHOLD, psis

if TYPE_CHECKING:
    from .posterior import Posterior

__all__ = ["ESS_RATIO_MIN", "diagnose", "joint_diagnose", "level_reasons", "globals_proposals"]

log = logging.getLogger("amortize.posterior")

ESS_RATIO_MIN = 0.3  # globals' importance ESS per draw below which q is too wide or off to use uncorrected


def globals_proposals(num_samples: int) -> int:
    """Global draws the verdict weighs for a budget of ``num_samples``: a quarter (each carries
    :data:`~amortize.hierarchical_is.GROUP_DRAWS` draws of every group), at least 100 (a PSIS tail of 30)."""
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


@torch.no_grad()
def diagnose(post: Posterior, num_samples: int, seed: int | None, repeats: int, flags: Any) -> list[dict[str, Any]]:
    """One verdict dict per dataset in input order (module docstring), for a not streamed posterior."""
    S = globals_proposals(num_samples)
    repeats = max(1, int(repeats))
    total = sum(len(m) for m, _ in post.parts)
    out: list[dict[str, Any]] = [{} for _ in range(total)]
    with post._seeded(seed):
        for members, part in post.parts:
            sets = [hierarchical_weights(part, S, GROUP_DRAWS) for _ in range(repeats)]
            joint = part.draws(int(num_samples), with_weights=True)[1]  # [n, B]
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
                why = [f"globals' {r}" for r in reasons(res.k, [])] + level_reasons(levels) + reasons(0.0, f)
                correctable = not why
                if res.k <= K_THRESHOLD and ratio < ESS_RATIO_MIN:
                    why.insert(
                        0,
                        f"globals' importance ESS {ratio:.0%} of the draws < {ESS_RATIO_MIN:.0%}: q is too"
                        " wide or off (sample(correct=True) applies)",
                    )
                if why:
                    log.warning("posterior may not be trustworthy: %s", "; ".join(why))
                out[i] = {
                    "pareto_k": res.k,
                    "pareto_k_sets": ks,
                    "ess": res.ess,
                    "ess_ratio": ratio,
                    "correctable": correctable,
                    "levels": levels,
                    "joint_pareto_k": psis(joint[:, j]).k,
                    "num_samples": S * repeats,
                    "group_draws": max(hw.group_draws for hw in sets),
                    "noise_sd": max(float(hw.noise_sd[j]) for hw in sets if hw.noise_sd is not None),
                    "flags": f,
                    "ok": not why,
                    "reason": "; ".join(why) or "ok",
                }
    return out


def joint_diagnose(post: Posterior, num_samples: int, seed: int | None, repeats: int, flags: Any) -> Any:
    """A model without global latents: the Pareto k of the joint weights p(y, z) / q(z | y), in the
    layout of ``Posterior.diagnostics``."""
    repeats = max(1, int(repeats))
    with post._seeded(seed):
        sets = [[lw for _, lw in post.proposals(num_samples)] for _ in range(repeats)]  # [repeat][part] [n, B]
    per: list[tuple[float, float, list[float]]] = [(0.0, 0.0, [])] * sum(len(m) for m, _ in post.parts)
    for p, (members, _) in enumerate(post.parts):
        pooled = torch.cat([one[p] for one in sets])
        for j, i in enumerate(members):
            res = psis(pooled[:, j])
            ks = [psis(one[p][:, j]).k for one in sets] if repeats > 1 else [res.k]
            per[i] = (res.k, res.ess, ks)
    total = repeats * int(num_samples)
    if post.layout == "list":
        return [_verdict([per[i]], flags[i], total) for i in range(len(post.datasets))]
    return _verdict(per, flags, total, batch=post.layout == "batch")


def _verdict(
    per: list[tuple[float, float, list[float]]], flags: list[str], num_samples: int, batch: bool = False
) -> dict[str, Any]:
    ks, ess, sets = [k for k, _, _ in per], [e for _, e, _ in per], [s for _, _, s in per]
    worst = max((k for k in ks if not math.isnan(k)), default=float("nan"))
    why = reasons(worst, flags)
    if why:
        log.warning("posterior may not be trustworthy: %s", "; ".join(why))
    return {
        "pareto_k": ks if batch else ks[0],
        "pareto_k_sets": sets if batch else sets[0],
        "ess": ess if batch else ess[0],
        "num_samples": num_samples,
        "flags": flags,
        "ok": not why,
        "reason": "; ".join(why) or "ok",
    }
