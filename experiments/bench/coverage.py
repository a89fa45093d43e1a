"""Model-coverage benchmark: each shipped model (default: the non-Gaussian, covariate, varying-slope
and 4-level ones) trained with the default objective, then

* SBC over ``--sbc-datasets`` prior draws (pass/fail and the worst quantity per model);
* ``--datasets`` held-out prior-predictive datasets against NUTS in the same run (z-error, sd
  ratio, coverage per level), judged against the model-coverage targets: group z median <= 0.2 and
  p90 <= 0.6, globals z median <= 0.3.

Prints the tables; writes JSON and markdown atomically.

    python experiments/bench/coverage.py [--models poisson_3level ...] [--load NAME=PATH ...] [--datasets 20]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import amortize as am
from amortize import models
from amortize.validate import sbc, to_markdown
from amortize.validate.heldout import against_nuts, heldout_datasets
from amortize.validate.results import machine_info, results_header, write_results

DEFAULT = ["poisson_3level", "logistic_3level", "gaussian_contextual", "varying_slopes", "gaussian_4level"]
TARGETS = {"group": (0.2, 0.6), "global": (0.3, None)}  # (z median, z p90)
COLUMNS = ["level", "z_median", "z_p90", "sd_ratio_median", "sd_ratio_p10", "sd_ratio_p90", "coverage90", "count"]


def _meets(row: dict[str, Any]) -> bool:
    med, p90 = TARGETS["group" if row["level"] not in (None, "global") else "global"]
    return row["z_median"] <= med and (p90 is None or row["z_p90"] <= p90)


def run_model(name: str, args: argparse.Namespace, progress: bool) -> tuple[dict[str, Any], str]:
    load = dict(item.split("=", 1) for item in args.load)
    model, sampler = getattr(models, name), models.SAMPLERS[name]()
    t0 = time.perf_counter()
    if name in load:
        a = am.Amortizer.load(load[name], model, sampler=sampler)
        train_s = float("nan")
    else:
        a = am.Amortizer(model, sampler, seed=args.seed)
        a.fit(steps=args.steps, batch_size=args.batch_size, progress=progress, checkpoint_path=f"{args.out}/{name}.pt")
        train_s = time.perf_counter() - t0
    entry: dict[str, Any] = {"steps": a.step, "train_seconds": train_s}
    md = [f"### {name} ({a.step} NPE steps)\n"]
    if args.sbc_datasets:
        res = sbc(a, num_datasets=args.sbc_datasets, num_samples=args.sbc_draws, seed=args.seed + 1, progress=progress)
        worst = min(res.rows, key=lambda r: r["p_value"])
        failing = [f"{r['quantity']} (90% coverage {r['coverage90']:.3f})" for r in res.rows if not r["passed"]]
        entry["sbc"] = {"passed": res.passed, "failing": failing, "rows": res.rows}
        md.append(
            f"SBC {res.num_datasets} x {res.num_draws}: {'PASS' if res.passed else 'FAIL'} "
            f"({len(res.rows)} quantities; lowest p {worst['p_value']:.3f} at {worst['quantity']}"
            f"{'; failing: ' + ', '.join(failing) if failing else ''})\n"
        )
    if args.datasets:
        nuts = {"num_warmup": args.nuts_warmup, "num_samples": args.nuts_samples, "num_chains": 2}
        ref_fn = None
        if name in args.numpyro:  # NUTS on the tested NumPyro twin of the same model (the bench extra)
            from numpyro_models import twin_reference

            ref_fn = twin_reference(
                name, num_warmup=2 * args.nuts_warmup, num_samples=args.nuts_samples, cache_dir=args.nuts_cache or None
            )

        report = against_nuts(
            a,
            heldout_datasets(a, args.datasets),
            args.draws,
            nuts,
            progress=progress,
            nuts_cache=args.nuts_cache or None,
            cached_only=args.cached_only,
            reference=ref_fn,
        )
        entry.update(report.to_dict())
        rows = [{**s, "meets_target": _meets(s)} for s in report.summary]
        ok = sum(r["ok"] for r in report.nuts)
        run = sum(not r.get("not_run") for r in report.nuts)
        md.append(
            f"{args.datasets} held-out datasets ({run} with a {'NumPyro-twin ' if ref_fn else ''}NUTS reference,"
            f" {ok} passing its checks), speed-up "
            f"{report.speedup:.0f}x (amortized {entry['amortized_seconds_per_dataset']:.3f} s, NUTS "
            f"{entry['nuts_seconds_per_dataset']:.1f} s per dataset)\n"
        )
        md.append(to_markdown(rows, COLUMNS + ["meets_target"]) if rows else "(no valid NUTS reference)")
    return entry, "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT, choices=sorted(models.SAMPLERS), metavar="MODEL")
    p.add_argument("--load", nargs="*", default=[], metavar="MODEL=CHECKPOINT", help="reuse trained checkpoints")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--datasets", type=int, default=20, help="held-out datasets against NUTS (0: none)")
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--sbc-datasets", type=int, default=200, help="SBC datasets (0: no SBC)")
    p.add_argument("--sbc-draws", type=int, default=999)
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-cache", default="checkpoints/nuts-cache", help="reuse NUTS references ('' : never)")
    p.add_argument("--cached-only", action="store_true", help="compare only where a NUTS reference is cached")
    p.add_argument(
        "--numpyro",
        nargs="*",
        default=[],
        metavar="MODEL",
        help="reference by NumPyro NUTS on the model's NumPyro twin (twice the warm-up, target acceptance 0.99)",
    )
    p.add_argument("--out", default="checkpoints/bench-coverage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    progress = not args.quiet and not os.environ.get("CI")
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {
        **machine_info(),
        "args": vars(args),
        "models": {},
    }
    md = [results_header(results) + "\n"]
    for name in args.models:
        results["models"][name], text = run_model(name, args, progress)
        md.append(text + "\n")
        print(text, flush=True)
        write_results(args.out, results, "\n".join(md), default=str)
    print(f"\nwritten: {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
