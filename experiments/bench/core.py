"""Acceptance benchmark of the core: each shipped model trained with the default objective (NPE),
compared with NUTS on held-out prior-predictive datasets in the same run, and eight schools on its
real data against posteriordb's reference draws. Prints the tables; writes JSON and markdown.

    python experiments/bench/core.py [--datasets 20] [--steps 3000] [--models gaussian_2level ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import amortize as am
from amortize import models
from amortize.validate import compare, element_name, reference, to_markdown
from amortize.validate.heldout import against_nuts, heldout_datasets
from amortize.validate.results import machine_info, results_header, write_results

# NUTS settings beyond 2 chains x (500 warm-up + 1000 draws): the 3-level model's centered funnels
# saturate trees of depth 10 (1023 leapfrog steps per draw); depth 8 keeps a reference to minutes,
# and the R-hat / ESS / divergence checks still decide whether it counts
NUTS_EXTRA = {"gaussian_3level": {"max_tree_depth": 8}}

COLUMNS = ["level", "z_median", "z_p90", "sd_ratio_median", "sd_ratio_p10", "sd_ratio_p90", "coverage90", "count"]


def train(
    name: str, steps: int, batch_size: int, root: str, seed: int, progress: bool, load: dict[str, str]
) -> tuple[am.Amortizer, float]:
    if name in load:  # a checkpoint trained earlier (its training time is not re-measured)
        return am.Amortizer.load(load[name], getattr(models, name), models.SAMPLERS[name]()), float("nan")
    amortizer = am.Amortizer(getattr(models, name), models.SAMPLERS[name](), seed=seed)
    t0 = time.perf_counter()
    amortizer.fit(steps=steps, batch_size=batch_size, progress=progress, checkpoint_path=f"{root}/{name}.pt")
    return amortizer, time.perf_counter() - t0


def eight_schools_vs_reference(amortizer: am.Amortizer, draws: int) -> dict:
    """Amortized and PSIS-corrected draws on the real data against posteriordb's reference draws."""
    y, sigma, ref = reference.eight_schools()
    data = models.eight_schools_data(y.tolist(), sigma.tolist())
    post = amortizer.posterior(data)
    levels = {s.name: s.level for s in amortizer.structure.latents}
    rows = compare(post.sample(draws, seed=0), ref, levels)
    corrected = post.sample(draws, seed=0, correct=True)
    for row, c in zip(rows, compare(corrected, ref, levels)):
        row.update(z_corrected=c["z"], sd_ratio_corrected=c["sd_ratio"])
    diag = post.diagnostics(num_samples=draws)
    return {
        "rows": rows,
        "diagnostics": diag,
        "corrected": bool(corrected.corrected),
        "pareto_k_corrected": corrected.pareto_k,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", nargs="+", default=["gaussian_2level", "gaussian_3level", "logistic_2level", "eight_schools"]
    )
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--datasets", type=int, default=20)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--out", default="checkpoints/bench-core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--nuts-cache", default="checkpoints/nuts-cache", help="reuse NUTS references ('' : never)")
    p.add_argument("--cached-only", action="store_true", help="compare only where a NUTS reference is cached")
    p.add_argument("--load", nargs="*", default=[], metavar="MODEL=CHECKPOINT", help="reuse trained checkpoints")
    p.add_argument(
        "--numpyro",
        nargs="*",
        default=[],
        metavar="MODEL",
        help="reference by NumPyro NUTS (2 x (1000 warm-up + 1000 draws), target acceptance 0.99) on the model's"
        " NumPyro twin (the bench extra)",
    )
    p.add_argument(
        "--correct", action="store_true", help="also compare sample(correct=True) (the hierarchical PSIS correction)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    progress = not args.quiet and not os.environ.get("CI")
    os.makedirs(args.out, exist_ok=True)
    results: dict = {
        **machine_info(extra=" (CPU)"),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "models": {},
    }
    md = [results_header(results) + "\n"]
    for name in args.models:
        load = dict(item.split("=", 1) for item in args.load)
        amortizer, train_s = train(name, args.steps, args.batch_size, args.out, args.seed, progress, load)
        entry: dict = {"train_seconds": train_s, "steps": amortizer.step}
        if name == "eight_schools":
            entry.update(eight_schools_vs_reference(amortizer, 4000))
            keys = ("z", "sd_ratio", "coverage90", "w1", "z_corrected", "sd_ratio_corrected")
            by_param = [{"level": element_name(r), **{k: r[k] for k in keys}} for r in entry["rows"]]
            table = to_markdown(by_param, ["level", *keys])
            head = (
                f"### eight schools (real data) vs posteriordb reference draws (train {train_s:.0f} s); Pareto k "
                f"{entry['pareto_k_corrected']:.2f}, correction {'applied' if entry['corrected'] else 'NOT applied'}\n"
            )
        else:
            nuts = {"num_warmup": 500, "num_samples": 1000, "num_chains": 2, **NUTS_EXTRA.get(name, {})}
            ref_fn = None
            if name in args.numpyro:  # NUTS on the NumPyro twin of the same model (the bench extra)
                from numpyro_models import twin_reference

                ref_fn = twin_reference(name, cache_dir=args.nuts_cache or None)

            report = against_nuts(
                amortizer,
                heldout_datasets(amortizer, args.datasets),
                args.draws,
                nuts,
                progress=progress,
                nuts_cache=args.nuts_cache or None,
                cached_only=args.cached_only,
                reference=ref_fn,
                correct=args.correct,
            )
            entry.update(report.to_dict())
            rows = [
                {
                    **s,
                    "amortized_s": entry["amortized_seconds_per_dataset"],
                    "nuts_s": entry["nuts_seconds_per_dataset"],
                }
                for s in report.summary
            ]
            table = to_markdown(rows, COLUMNS + ["amortized_s", "nuts_s"])
            ok = sum(r["ok"] for r in report.nuts)
            run = sum(not r.get("not_run") for r in report.nuts)
            which = "NumPyro NUTS on the model's NumPyro twin" if ref_fn else "Pyro NUTS"
            head = (
                f"### {name}: {run} of {args.datasets} held-out datasets ({ok} with {which} passing its checks), "
                f"{amortizer.step} NPE steps (train {train_s:.0f} s), speed-up {report.speedup:.0f}x\n"
            )
            if report.corrected:
                applied = [c for c in report.corrected if c["applied"]]
                table += (
                    f"\n\nWith `sample(correct=True)`: applied on {len(applied)} of {len(report.corrected)} datasets"
                    " (proposals' k <= 0.7; elsewhere the draws are the uncorrected ones)\n\n"
                    + to_markdown(report.corrected_summary, COLUMNS)
                )
        results["models"][name] = entry
        md.append(head + "\n" + table + "\n")
        print(head + table, flush=True)
        write_results(args.out, results, "\n".join(md))
    print(f"\nwritten: {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
