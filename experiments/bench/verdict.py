"""Does the per-dataset verdict (``post.diagnostics()``) tell good posteriors from bad ones (issue #20)?

Per model (the shipped 2-level and 3-level Gaussians, trained here with ``--steps``, the 2-level one on
a design of 400-700 groups, ``gaussian_2level_large``, and one the verdict was not tuned on: the shipped
Bernoulli ``logistic_2level`` on 1000-2000 groups of 1-8 rows, singletons among them,
``logistic_2level_many``):

* cases: held-out prior-predictive datasets; the same datasets under an amortizer trained for 5% of
  the steps; for a Gaussian response data with 5x the noise, with Student-t (df 2) noise added, and
  responses x 100; a design with 4x the trained groups;
* truth by NUTS on the same data where it is affordable and its checks pass (held-out, undertrained,
  5x noise, 4x groups): good when the amortized posterior agrees (globals' and groups' z p90 <= 0.3),
  bad when it does not (> 0.5), unclear between; by construction otherwise: Student-t noise is
  ``misspecified`` (the model check should say so), responses x 100 ``bad`` (``judged_by``);
* for each row the verdict (``ok``, ``reason``), the globals' k, their weighted mean shift, the per-group k
  p90, the joint k (from 250 joint draws; the verdict does not compute it), the local SBC (``local_ok``, its
  smallest p-value and quantity), and which criteria flagged it (``by``: the verdict's ``failed``, i.e. ``k``
  globals' k, ``ess`` globals' ESS, ``shift`` the globals' weighted mean shift, ``groups`` a level's p90 k,
  ``model`` the model check, ``range`` a flag; and ``local`` where the local SBC, which is reported and does
  not decide, flagged it); its cost in ms per dataset (with and without the local SBC) next to drawing 1000
  draws; on held-out rows the globals'
  z p90 of the hierarchically corrected draws next to the uncorrected ones; ``ok`` of a second verdict
  on other streams (``ok_other_seed``; how often it differs is printed).

Prints the confusion table (good/bad x ok/not ok) per model and writes ``results.json`` and
``results.md`` (atomically) to ``--out``.

    python experiments/bench/verdict.py                                   # the full run (hours on 2 CPUs)
    python experiments/bench/verdict.py --steps 300 --heldout 2 --nuts-samples 200   # a few minutes
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import amortize as am
from amortize import models
from amortize.posterior import psis_k
from amortize.validate import compare, to_markdown
from amortize.validate.heldout import heldout_datasets
from amortize.validate.nuts import cached_nuts
from amortize.validate.results import machine_info, results_header, write_results

MODELS = {
    "gaussian_2level": models.gaussian_2level,
    "gaussian_3level": models.gaussian_3level,
    "gaussian_2level_large": models.gaussian_2level,  # 400-700 groups: 400-700 group latents
    # a design the verdict was not tuned on: Bernoulli, 1000-2000 groups, 1-8 rows each (singletons)
    "logistic_2level_many": models.logistic_2level,
}
SAMPLERS = {
    **models.SAMPLERS,
    "gaussian_2level_large": lambda: am.StructureSampler(["group"], groups={"group": (400, 700)}, obs=(2, 12)),
    "logistic_2level_many": lambda: am.StructureSampler(
        ["group"],
        groups={"group": (1000, 2000)},
        obs=(1, 8),
        covariates={"obs": {"x": {"dist": "normal"}}},
        vary_sizes=True,
    ),
}
# the NumPyro twin of a design's model (--numpyro)
TWINS = {"gaussian_2level_large": "gaussian_2level", "logistic_2level_many": "logistic_2level"}
# the wrong cases of a model beside its undertrained amortizer: those of a Gaussian response by default
CASES = {"logistic_2level_many": ("groups_x4",)}
GAUSSIAN_CASES = ("noise_x5", "student_t", "groups_x4", "response_x100")
GOOD_Z, BAD_Z = 0.3, 0.5
NUTS_JUDGED = ("held-out", "undertrained 5%", "noise_x5", "groups_x4")  # the cases whose truth NUTS decides


def _z_p90(draws: Any, ref: Any, levels: dict[str, str | None]) -> tuple[float, float]:
    rows = compare(draws, ref.samples, levels)
    glob = [r["z"] for r in rows if levels.get(r["site"]) is None]
    group = [r["z"] for r in rows if levels.get(r["site"]) is not None]
    return float(np.quantile(glob, 0.9)), float(np.quantile(group, 0.9)) if group else 0.0


def _variant(a: am.Amortizer, data: am.HierarchicalData, kind: str, seed: int) -> am.HierarchicalData:
    """A deliberately wrong dataset for ``a``: more noise, heavy-tailed noise, 4x groups, x 100."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "groups_x4":
        top = data.levels[0]
        hi = a.ranges.get(top, [data.size(top)] * 2)[1]
        design = a.sampler.sample(gen)  # tiled to 4x the trained maximum of the outermost groups
        reps = max(1, int(np.ceil(4 * hi / design.size(top))))
        sim = _sim(a, _tile(design, reps), seed)
        return sim.data.with_response(sim.data.y[0])
    sim = _sim(a, data.with_response(None), seed)
    y, sigma = sim.data.y[0], float(sim.latents["sigma"].reshape(-1)[0])
    if kind == "noise_x5":
        return data.with_response(y + (24**0.5) * sigma * torch.randn(y.shape, generator=gen))
    if kind == "student_t":
        z, u = torch.randn(y.shape, generator=gen), torch.rand(y.shape, generator=gen)
        t = z / torch.sqrt(-torch.log(u))  # Student-t, df 2: chi2(2) / 2 is Exp(1)
        return data.with_response(y + sigma * t)
    if kind == "response_x100":
        return data.with_response(100.0 * y)
    raise ValueError(kind)


def _tile(design: am.HierarchicalData, reps: int) -> am.HierarchicalData:
    """``reps`` copies of a design side by side (the outermost groups repeated, with their covariates)."""
    levels = list(design.levels)
    parents, offsets = {}, {lvl: design.size(lvl) for lvl in levels}
    for lvl in levels[1:]:
        above = levels[levels.index(lvl) - 1]
        p = design.parents[lvl]
        parents[lvl] = torch.cat([p + r * offsets[above] for r in range(reps)])
    group = torch.cat([design.group + r * offsets[levels[-1]] for r in range(reps)])
    covariates = {lvl: {k: torch.cat([v] * reps) for k, v in cols.items()} for lvl, cols in design.covariates.items()}
    return am.HierarchicalData(levels, parents, group, covariates=covariates)


def _sim(a: am.Amortizer, design: am.HierarchicalData, seed: int) -> Any:
    """One dataset simulated from ``a``'s model on ``design``, on a stream of its own (``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return am.simulate(a.model, a.structure, design, 1)


def _flagged_by(diag: dict[str, Any]) -> str:
    """Which criteria said no (the verdict's ``failed``), and ``local`` where the local SBC, which does not
    decide, flagged it (``-`` none)."""
    by = list(diag["failed"]) + (["local"] if diag.get("local_sbc", {}).get("ok") is False else [])
    return "+".join(by) or "-"


@torch.no_grad()
def _joint_k(post: am.Posterior, seed: int, draws: int = 250) -> float:
    """The Pareto k of the joint weights p(y, z) / q(z | y) over every latent from ``draws`` joint draws
    (the verdict does not compute it: it degenerates with the number of groups even for a good q)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return psis_k(post.proposals(draws)[0][1][:, 0])


def _row(post: am.Posterior, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    post.sample(1000, seed=seed)
    t1 = time.perf_counter()
    post.diagnostics(args.verdict_draws, seed=seed, local_sbc=False)
    t2 = time.perf_counter()
    diag = post.diagnostics(args.verdict_draws, seed=seed, local_sbc=True)
    t3 = time.perf_counter()
    other = post.diagnostics(args.verdict_draws, seed=seed + 7919, local_sbc=False)  # ok on other streams
    worst_p90 = max((v["k_p90"] for v in diag["levels"].values()), default=float("nan"))
    local = diag["local_sbc"]
    quantities = local.get("quantities", {})
    return {
        "ok": diag["ok"],
        "ok_other_seed": other["ok"],
        "globals_k_other_seed": other["pareto_k"],
        "by": _flagged_by(diag),
        "reason": diag["reason"],
        "globals_k": diag["pareto_k"],
        "ess_ratio": diag["ess_ratio"],
        "shift_z": diag["shift"]["z"],
        "shift_se": diag["shift"]["se"],
        "shift_site": diag["shift"]["site"],
        "group_k_p90": worst_p90,
        "joint_k": _joint_k(post, seed),
        "group_draws": diag["group_draws"],
        "local_ok": local["ok"],
        "local_p_min": min((v["p_value"] for v in quantities.values()), default=float("nan")),
        "local_worst": local.get("worst", local.get("skipped", "")),
        "local_shift": quantities[local["worst"]]["shift"] if "worst" in local else float("nan"),
        "local_shift_flagged": max((abs(v["shift"]) for v in quantities.values() if not v["inside"]), default=0.0),
        "verdict_ms": 1e3 * (t3 - t2),
        "verdict_ms_without_local": 1e3 * (t2 - t1),
        "draw_ms": 1e3 * (t1 - t0),
    }


def _trained(name: str, model: Any, sampler: am.StructureSampler, steps: int, args: argparse.Namespace) -> am.Amortizer:
    """An amortizer of ``model`` trained for ``steps``, kept in ``--out`` and reused from there with ``--reuse``."""
    path = Path(args.out) / f"{name}-{steps}-seed{args.seed}.pt"
    if args.reuse and path.exists():
        return am.Amortizer.load(path, model, sampler)
    a = am.Amortizer(model, sampler, seed=args.seed)
    a.fit(steps=steps, batch_size=args.batch_size, progress=False)
    a.save(path)
    return a


def run_model(name: str, args: argparse.Namespace) -> tuple[dict, str]:
    model = MODELS[name]
    sampler = SAMPLERS[name]()
    good = _trained(name, model, sampler, args.steps, args)
    under = _trained(name, model, sampler, max(1, args.steps // 20), args)
    levels = {s.name: s.level for s in good.structure.latents}
    nuts_cfg = {"num_warmup": args.nuts_warmup, "num_samples": args.nuts_samples, "num_chains": 2}
    twin = None
    if name in args.numpyro:  # NUTS on the NumPyro twin of the same model (the bench extra)
        from numpyro_models import twin_reference

        twin = twin_reference(
            TWINS.get(name, name), args.nuts_warmup, args.nuts_samples, cache_dir=args.nuts_cache or None
        )
    rows: list[dict[str, Any]] = []

    def judged(post: am.Posterior, data: am.HierarchicalData, i: int, case: str, by_construction: str) -> dict:
        """The row of ``post``, its truth by NUTS on ``data`` where ``case`` is one NUTS judges and the
        reference passed (good: z p90 <= 0.3; bad: > 0.5; unclear between), else ``by_construction``."""
        entry = {"model": name, "dataset": i, "case": case, **_row(post, args, i)}
        ref = None
        if case in args.nuts_cases:
            seed = i if case in ("held-out", "undertrained 5%") else 1000 * i + NUTS_JUDGED.index(case)
            if twin is not None:
                ref = twin(data, seed)
            else:
                ref = cached_nuts(model, data, args.nuts_cache or None, seed=seed, **nuts_cfg)
        if ref is None or not ref.ok:
            return {**entry, "truth": by_construction, "judged_by": "construction"}
        zg, zgroup = _z_p90(post.sample(1000, seed=i), ref, levels)
        z = max(zg, zgroup)
        truth = "good" if z <= GOOD_Z else "bad" if z > BAD_Z else "unclear"
        entry.update(truth=truth, judged_by="NUTS", z_globals=zg, z_groups=zgroup)
        if case == "held-out":
            entry["z_globals_corrected"] = _z_p90(post.sample(1000, seed=i, correct=True), ref, levels)[0]
        return entry

    for i, data in enumerate(heldout_datasets(good, args.heldout, seed=args.seed + 10_000)):
        rows.append(judged(good.posterior(data), data, i, "held-out", "no reference"))
        rows.append(judged(under.posterior(data), data, i, "undertrained 5%", "bad"))
        for kind in CASES.get(name, GAUSSIAN_CASES):
            bad = _variant(good, data, kind, seed=1000 * i + 7)
            truth = "misspecified" if kind == "student_t" else "bad"
            rows.append(judged(good.posterior(bad), bad, i, kind, truth))
    truths = ("good", "bad", "unclear", "misspecified", "no reference")
    confusion = {t: {"ok": 0, "not ok": 0} for t in truths}
    for r in rows:
        confusion[r["truth"]]["ok" if r["ok"] else "not ok"] += 1
        crit = ["k", "ess", "shift", "groups", "local", "model", "range"]
        for c in crit:  # per criterion: the rows it flagged
            confusion[r["truth"]].setdefault(f"by {c}", 0)
            confusion[r["truth"]][f"by {c}"] += c in r["by"].split("+")
    flips = sum(r["ok"] != r["ok_other_seed"] for r in rows)
    cost = {
        "ok_flips_between_seeds": flips,
        "verdict_ms_median": float(np.median([r["verdict_ms"] for r in rows])),
        "verdict_ms_without_local_median": float(np.median([r["verdict_ms_without_local"] for r in rows])),
        "draw_ms_median": float(np.median([r["draw_ms"] for r in rows])),
    }
    table = [{"truth": t, **c} for t, c in confusion.items() if c["ok"] + c["not ok"]]
    wrong = 1 + len(CASES.get(name, GAUSSIAN_CASES))
    md = [f"### {name}: {args.heldout} held-out datasets ({args.steps} steps), {wrong} wrong cases each\n"]
    by = [f"by {c}" for c in ("k", "ess", "shift", "groups", "local", "model", "range")]
    md.append(to_markdown(table, ["truth", "ok", "not ok", *by]))
    md.append(
        f"\n`ok` differs between two verdict seeds on {flips} of {len(rows)} rows; "
        f"verdict {cost['verdict_ms_median']:.0f} ms per dataset (median; without the local SBC"
        f" {cost['verdict_ms_without_local_median']:.0f} ms), drawing 1000 draws {cost['draw_ms_median']:.0f} ms\n"
    )
    per_case: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        c = per_case.setdefault((r["case"], r["truth"]), {"case": r["case"], "truth": r["truth"], "ok": 0, "not ok": 0})
        c["ok" if r["ok"] else "not ok"] += 1
    md.append(to_markdown(list(per_case.values()), ["case", "truth", "ok", "not ok"]) + "\n")
    cols = ["case", "dataset", "truth", "judged_by", "ok", "ok_other_seed", "by"]
    cols += ["globals_k", "ess_ratio", "shift_z", "shift_se", "shift_site", "group_k_p90", "joint_k"]
    cols += [
        "local_p_min",
        "local_worst",
        "local_shift",
        "local_shift_flagged",
        "z_globals",
        "z_globals_corrected",
        "verdict_ms",
        "reason",
    ]
    md.append(to_markdown(rows, cols))
    return {"rows": rows, "confusion": confusion, **cost}, "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=3000, help="training steps of the good amortizers (5%% undertrained)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--heldout", type=int, default=20)
    p.add_argument("--verdict-draws", type=int, default=1000, help="num_samples of diagnostics()")
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-cache", default="checkpoints/nuts-cache", help="reuse NUTS references ('' : never)")
    p.add_argument("--nuts-cases", nargs="+", default=list(NUTS_JUDGED), choices=NUTS_JUDGED, help="cases NUTS judges")
    p.add_argument("--numpyro", nargs="*", default=[], choices=list(MODELS), help="NUTS on these models' NumPyro twins")
    p.add_argument("--out", default="checkpoints/bench-verdict")
    p.add_argument("--reuse", action="store_true", help="reuse the amortizers an earlier run kept in --out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    results: dict[str, Any] = {**machine_info(), "args": vars(args)}
    md = [results_header(results, f"settings: {' '.join(sys.argv[1:]) or 'defaults'}") + "\n"]
    for name in args.models:
        results[name], text = run_model(name, args)
        md.append(text)
        print(text, flush=True)
        write_results(args.out, results, "\n".join(md), safe=True)
    print(f"\nwritten: {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
