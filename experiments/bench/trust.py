"""Acceptance benchmark of the trust features: SBC, PSIS correction, radon vs Inference Gym, range flags.

1. SBC (200 datasets, 999 draws each) of the shipped 2-level and 3-level Gaussian models trained with
   the default objective (NPE): a pass/fail per scalar quantity (family-wise 95%).
2. On 20 held-out 2-level datasets against NUTS: z p90 of the globals for IS-corrected draws
   (``sample(n, correct=True)``) and uncorrected draws, over datasets with Pareto k <= 0.7; k and
   the importance ESS for every dataset.
3. Radon Minnesota (contextual effects, HalfNormal scale priors, 85 counties): every one of the 90
   parameters against Inference Gym's ground-truth means and sds (z <= 0.3, sd ratio in [0.8, 1.25]).
4. A 2-level dataset with 4x the trained maximum number of groups must raise the range flag.

Models are trained here (``--steps``) or loaded (``--checkpoint NAME=PATH``, a checkpoint file or run
directory; NAME is gaussian_2level, gaussian_3level or radon). Prints the tables; writes
``results.json`` and ``results.md`` (atomically, after every section) to ``--out``.

    python experiments/bench/trust.py                       # the full acceptance run (hours on 2 CPUs)
    python experiments/bench/trust.py --steps 300 --heldout 3 --nuts-samples 300   # a quick check
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import numpy as np
import torch

import amortize as am
from amortize import models
from amortize.models.radon import radon_contextual_effects, radon_minnesota_data, radon_sampler
from amortize.validate import compare, element_name, reference, sbc, summarize, to_markdown
from amortize.validate.heldout import heldout_datasets
from amortize.validate.nuts import cached_nuts
from amortize.validate.results import machine_info, results_header, write_results

MODELS = {
    "gaussian_2level": (models.gaussian_2level, models.SAMPLERS["gaussian_2level"]),
    "gaussian_3level": (models.gaussian_3level, models.SAMPLERS["gaussian_3level"]),
    "radon": (radon_contextual_effects, radon_sampler),
}


def amortizer_for(name: str, args: argparse.Namespace, progress: bool) -> tuple[am.Amortizer, dict[str, Any]]:
    """Load ``--checkpoint NAME=PATH`` or train with the default objective (checkpoint in ``--out``)."""
    model, sampler = MODELS[name]
    path = dict(c.split("=", 1) for c in args.checkpoint).get(name)
    if path:
        a = am.Amortizer.load(path, model, sampler=sampler())
        return a, {"checkpoint": path, "steps": a.step, "objective": a.config.objective}
    a = am.Amortizer(model, sampler(), seed=args.seed)
    t0 = time.perf_counter()
    a.fit(steps=args.steps, batch_size=args.batch_size, progress=progress, checkpoint_path=f"{args.out}/{name}.pt")
    return a, {"trained_seconds": time.perf_counter() - t0, "steps": a.step, "objective": a.config.objective}


def sbc_section(name: str, a: am.Amortizer, args: argparse.Namespace, progress: bool) -> tuple[dict, str]:
    res = sbc(a, num_datasets=args.sbc_datasets, num_samples=args.sbc_draws, seed=args.seed + 1, progress=progress)
    head = (
        f"### SBC {name}: {res.num_datasets} datasets x {res.num_draws} draws, band "
        f"{1 - res.alpha_per_quantity:.2%} per quantity (family-wise 95%): {'PASS' if res.passed else 'FAIL'}\n"
    )
    res.plot(f"{args.out}/sbc_{name}_ecdf.png")
    table = to_markdown(res.rows, ["quantity", "level", "max_abs_diff", "p_value", "passed"])
    return {k: v for k, v in res.to_dict().items() if k != "band"}, head + "\n" + table


def correction_section(a: am.Amortizer, args: argparse.Namespace, progress: bool) -> tuple[dict, str]:
    levels = {s.name: s.level for s in a.structure.latents}
    globals_ = {s.name for s in a.structure.latents if s.level is None}
    nuts_cfg = {"num_warmup": args.nuts_warmup, "num_samples": args.nuts_samples, "num_chains": 2}
    per, rows_u, rows_c = [], [], []
    for i, data in enumerate(heldout_datasets(a, args.heldout, seed=args.seed + 10_000)):
        post = a.posterior(data)
        u = post.sample(args.draws, seed=i)
        c = post.sample(args.draws, seed=i, correct=True, oversample=args.oversample)
        ref = cached_nuts(a.model, data, args.nuts_cache or None, seed=i, **nuts_cfg)
        entry = {"dataset": i, "groups": data.size("group"), "pareto_k": c.pareto_k, "ess": c.ess}
        entry.update(corrected=c.corrected, nuts_ok=ref.ok, nuts=ref.summary())
        if ref.ok:
            ru, rc = compare(u, ref.samples, levels), compare(c, ref.samples, levels)
            entry["global_z_uncorrected"] = max(r["z"] for r in ru if r["site"] in globals_)
            entry["global_z_corrected"] = max(r["z"] for r in rc if r["site"] in globals_)
            if c.corrected:
                rows_u += [{**r, "dataset": i} for r in ru]
                rows_c += [{**r, "dataset": i} for r in rc]
        per.append(entry)
        if progress:
            print(f"  dataset {i}: k {c.pareto_k:.2f}, {ref.summary()}", file=sys.stderr)
    out: dict[str, Any] = {"datasets": per, "draws": args.draws, "oversample": args.oversample, "nuts": nuts_cfg}
    used = len({r["dataset"] for r in rows_u})
    md = [f"### PSIS correction, 2-level: {args.heldout} held-out datasets vs NUTS ({used} with k <= 0.7, NUTS ok)\n"]
    if rows_u:
        zu = float(np.quantile([r["z"] for r in rows_u if r["site"] in globals_], 0.9))
        zc = float(np.quantile([r["z"] for r in rows_c if r["site"] in globals_], 0.9))
        out.update(global_z_p90_uncorrected=zu, global_z_p90_corrected=zc, reduction=1 - zc / zu)
        out["summary_uncorrected"], out["summary_corrected"] = summarize(rows_u), summarize(rows_c)
        both = [{"draws": "uncorrected", **s} for s in out["summary_uncorrected"]]
        both += [{"draws": "IS-corrected", **s} for s in out["summary_corrected"]]
        cols = ["draws", "level", "z_median", "z_p90", "sd_ratio_median", "coverage90", "count"]
        md.append(f"globals' z p90: {zu:.3f} -> {zc:.3f} ({1 - zc / zu:.0%} lower; target >= 30%)\n")
        md.append(to_markdown(both, cols))
    cols = ["dataset", "groups", "pareto_k", "ess", "corrected", "nuts_ok"]
    cols += ["global_z_uncorrected", "global_z_corrected"]
    md += ["\nPareto k for every dataset:\n", to_markdown(per, cols)]
    return out, "\n".join(md)


def radon_section(a: am.Amortizer, args: argparse.Namespace) -> tuple[dict, str]:
    data = radon_minnesota_data()
    _, ref = reference.radon_minnesota("halfnormal")
    levels = {s.name: s.level for s in a.structure.latents}
    post = a.posterior(data)
    diag = post.diagnostics(num_samples=args.draws, seed=0)
    out: dict[str, Any] = {"diagnostics": diag}
    md = []
    variants = {"amortized": post.sample(4000, seed=0)}
    corrected = post.sample(4000, seed=0, correct=True, oversample=args.oversample)
    if corrected.corrected:
        variants["IS-corrected"] = corrected
    for label, draws in variants.items():
        rows = compare(draws, ref, levels)
        ok = [r["z"] <= 0.3 and 0.8 <= r["sd_ratio"] <= 1.25 for r in rows]
        worst_z = max(rows, key=lambda r: r["z"])
        ratios = [r["sd_ratio"] for r in rows]
        out[label] = {
            "parameters": len(rows),
            "within": int(sum(ok)),
            "passed": all(ok),
            "z_max": worst_z["z"],
            "z_max_at": element_name(worst_z),
            "sd_ratio_min": min(ratios),
            "sd_ratio_max": max(ratios),
            "rows": rows,
            "summary": summarize(rows, by="site"),
        }
        md.append(
            f"{label}: {sum(ok)}/{len(rows)} parameters within z <= 0.3 and sd ratio [0.8, 1.25] "
            f"({'PASS' if all(ok) else 'FAIL'}); worst z {worst_z['z']:.3f} ({out[label]['z_max_at']}), "
            f"sd ratio {min(ratios):.3f}-{max(ratios):.3f}\n"
        )
        md.append(to_markdown(out[label]["summary"], ["site", "z_median", "z_p90", "sd_ratio_p10", "sd_ratio_p90"]))
    head = (
        f"### Radon Minnesota vs Inference Gym (HalfNormal priors, 90 parameters); Pareto k "
        f"{diag['pareto_k']:.2f}, flags {diag['flags'] or 'none'}\n"
    )
    return out, head + "\n" + "\n".join(md)


def flag_section(a: am.Amortizer) -> tuple[dict, str]:
    lo_obs, hi_obs = a.ranges["obs"]
    groups = 4 * a.ranges["group"][1]
    group = torch.arange(groups).repeat_interleave((lo_obs + hi_obs) // 2)
    structure = am.HierarchicalData(["group"], {}, group)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sim = am.simulate(a.model, a.structure, structure, 1)
    diag = a.posterior(sim.data.with_response(sim.data.y[0])).diagnostics(num_samples=200)
    raised = any("level 'group'" in f for f in diag["flags"]) and not diag["ok"]
    out = {"groups": groups, "flags": diag["flags"], "ok": diag["ok"], "pareto_k": diag["pareto_k"], "raised": raised}
    verdict = "raised" if raised else "NOT raised"
    md = f"### Out-of-range input: {groups} groups (4x the trained maximum): flag {verdict}\n\n"
    return out, md + "\n".join(f"- {f}" for f in diag["flags"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="training steps of each model (default objective)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH", help="load instead of training")
    p.add_argument("--sbc-datasets", type=int, default=200)
    p.add_argument("--sbc-draws", type=int, default=999)
    p.add_argument("--heldout", type=int, default=20, help="held-out 2-level datasets for the PSIS comparison")
    p.add_argument("--draws", type=int, default=1000, help="draws per dataset (corrected: from oversample x as many)")
    p.add_argument("--oversample", type=int, default=4)
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--sections", nargs="+", default=["sbc", "correction", "radon", "flag"])
    p.add_argument("--out", default="checkpoints/bench-trust")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--nuts-cache", default="checkpoints/nuts-cache", help="reuse NUTS references ('' : never)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    progress = not args.quiet and not os.environ.get("CI")
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {**machine_info(), "args": vars(args)}
    md = [results_header(results, f"settings: {' '.join(sys.argv[1:]) or 'defaults'}") + "\n"]
    cache: dict[str, am.Amortizer] = {}

    def get(name: str) -> am.Amortizer:
        if name not in cache:
            cache[name], results.setdefault("training", {})[name] = amortizer_for(name, args, progress)
        return cache[name]

    def emit(key: str, section: tuple[dict, str]) -> None:
        results[key], text = section
        md.append(text)
        print(text, flush=True)
        write_results(args.out, results, "\n".join(md), safe=True)

    if "sbc" in args.sections:
        for name in ("gaussian_2level", "gaussian_3level"):
            emit(f"sbc_{name}", sbc_section(name, get(name), args, progress))
    if "correction" in args.sections:
        emit("correction", correction_section(get("gaussian_2level"), args, progress))
    if "radon" in args.sections:
        emit("radon", radon_section(get("radon"), args))
    if "flag" in args.sections:
        emit("flag", flag_section(get("gaussian_2level")))
    print(f"\nwritten: {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
