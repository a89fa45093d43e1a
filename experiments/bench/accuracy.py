"""Accuracy beyond the typical dataset, 2-level ragged Gaussian, against NUTS in the same run:

* ``in range``: prior-predictive datasets on training-range structures (uncorrected and IS-corrected);
* ``funnel``: group sd tau fixed at 0.05, 0.15, 0.3 (mu, sigma from the prior);
* ``noise``: observation sd sigma fixed at 0.01;
* ``extrapolate``: 4x the trained number of groups and 5x the trained group size, no retraining
  (amortized draws as they are, and IS-corrected where Pareto k <= 0.7).

The reference is Pyro NUTS on the same model (``--reference pyro``, cached), or NUTS on the NumPyro
version of the same model (``--reference numpyro``, the ``bench`` extra), which takes the
extrapolation case's 30k-row datasets in minutes rather than hours.

Every dataset is simulated from the model with the named site conditioned; prints per case the
group and global z-errors and sd ratios, the diagnostics' Pareto k and range flags; writes JSON and
markdown atomically.

    python experiments/bench/accuracy.py --checkpoint checkpoints/dev/g2.pt [--datasets 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

import amortize as am
from amortize import models
from amortize.validate import compare, summarize, to_markdown
from amortize.validate.nuts import cached_nuts
from amortize.validate.results import machine_info, results_header, write_results

CASES: dict[str, dict[str, Any]] = {
    "in range": {"condition": {}},
    "funnel tau=0.05": {"condition": {"tau": 0.05}},
    "funnel tau=0.15": {"condition": {"tau": 0.15}},
    "funnel tau=0.3": {"condition": {"tau": 0.3}},
    "noise sigma=0.01": {"condition": {"sigma": 0.01}},
    "4x groups, 5x size": {"condition": {}, "scale_groups": 4, "scale_obs": 5},
}
COLUMNS = ["draws", "level", "z_median", "z_p90", "sd_ratio_median", "sd_ratio_p10", "sd_ratio_p90", "coverage90"]


def case_datasets(a: am.Amortizer, case: dict[str, Any], num: int, seed: int) -> list[am.HierarchicalData]:
    """``num`` datasets on structures from the training ranges (scaled for extrapolation), simulated
    with the case's sites held at their values."""
    base = a.sampler
    sampler = base
    if case.get("scale_groups"):
        (glo, ghi), (olo, ohi) = base.groups["group"], base.obs
        sg, so = case["scale_groups"], case["scale_obs"]
        sampler = am.StructureSampler(base.levels, groups={"group": (sg * glo, sg * ghi)}, obs=(so * olo, so * ohi))
    gen = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    fixed = {k: torch.tensor(v) for k, v in case["condition"].items()}
    out = []
    while len(out) < num:
        data = sampler.sample(gen)
        tr = poutine.trace(poutine.condition(a.model, fixed)).get_trace(data.with_response(None))
        y = tr.nodes[a.structure.response]["value"].detach()
        if torch.isfinite(y).all():
            out.append(data.with_response(y))
    return out


def run_case(name: str, case: dict[str, Any], a: am.Amortizer, args: argparse.Namespace) -> tuple[dict, str]:
    levels = {s.name: s.level for s in a.structure.latents}
    nuts_cfg = {"num_warmup": args.nuts_warmup, "num_samples": args.nuts_samples, "num_chains": 2}
    rows: dict[str, list[dict[str, Any]]] = {"amortized": [], "IS-corrected": []}
    per = []
    for i, data in enumerate(case_datasets(a, case, args.datasets, args.seed + 7)):
        post = a.posterior(data)
        q = post.sample(args.draws, seed=i)
        c = post.sample(args.draws, seed=i, correct=True, oversample=args.oversample)
        if args.reference == "numpyro":  # same math (tested), compiled: the 30k-row datasets in minutes
            from numpyro_models import run_numpyro_nuts

            ref = run_numpyro_nuts(data, "gaussian_2level", seed=i, **nuts_cfg)
        else:
            ref = cached_nuts(a.model, data, args.nuts_cache or None, seed=i, **nuts_cfg)
        flags = post.range_flags()
        per.append(
            {
                "dataset": i,
                "groups": data.size("group"),
                "obs": data.n_obs,
                "pareto_k": c.pareto_k,
                "corrected": c.corrected,
                "flags": "; ".join(flags),
                "nuts_ok": ref.ok,
            }
        )
        if not ref.ok:
            continue
        rows["amortized"] += [{**r, "dataset": i} for r in compare(q, ref.samples, levels)]
        rows["IS-corrected"] += [{**r, "dataset": i} for r in compare(c, ref.samples, levels)]
        print(f"  {name} {i}: k {c.pareto_k:.2f}, flags {flags or 'none'}; {ref.summary()}", file=sys.stderr)
    table = []
    for label, r in rows.items():
        table += [{"draws": label, **s} for s in summarize(r)] if r else []
    head = f"### {name}: {len(per)} datasets ({sum(p['nuts_ok'] for p in per)} with NUTS passing its checks)\n"
    md = head + "\n" + to_markdown(table, COLUMNS + ["count"])
    md += "\n\n" + to_markdown(per, ["dataset", "groups", "obs", "pareto_k", "corrected", "flags", "nuts_ok"])
    return {
        "summary": table,
        "datasets": per,
        "rows": rows["amortized"],
    }, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trained gaussian_2level amortizer")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE")
    p.add_argument("--datasets", type=int, default=5, help="datasets per case")
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--oversample", type=int, default=4)
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-cache", default="checkpoints/nuts-cache", help="reuse NUTS references ('' : never)")
    p.add_argument(
        "--reference",
        default="pyro",
        choices=["pyro", "numpyro"],
        help="NUTS on the Pyro model (cached) or on its NumPyro twin (the bench extra)",
    )
    p.add_argument("--out", default="checkpoints/bench-accuracy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    a = am.Amortizer.load(args.checkpoint, models.gaussian_2level, sampler=models.SAMPLERS["gaussian_2level"]())
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {
        **machine_info(extra=" (CPU)"),
        "checkpoint": args.checkpoint,
        "steps": a.step,
        "cases": {},
    }
    md = [results_header(results, f"checkpoint of {a.step} steps") + "\n"]
    for name in args.cases:
        entry, text = run_case(name, CASES[name], a, args)
        results["cases"][name] = entry
        md.append(text + "\n")
        print(text, flush=True)
        write_results(args.out, results, "\n".join(md))
    print(f"\nwritten: {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
