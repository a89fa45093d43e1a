"""Real-size designs trained on their fixed structure: accuracy against NUTS as training goes on.

Issue #19's targets: a 3-level Gaussian of ~31,000 rows with ~2,400 middle-level groups and a 3-level
Bernoulli of ~2,250 rows with ~1,500 mothers of 1-2 rows each (the designs of ``real_designs.py``, built
with the simulator at their real sizes), each trained on ONE fixed structure with library defaults
(``StructureSampler.fixed``: the structure and covariates of one simulated dataset, fresh responses
every step), reaching group z median <= 0.1 (0.2 for Bernoulli), p90 <= 0.3 (0.5), globals z p90 <= 0.3
and sd ratio 0.9-1.1 against NUTS on the same design, within 15 minutes of training on this machine.

Training runs ``--steps`` steps of ``--batch-size`` datasets, in ``--snapshots`` equal pieces of one
schedule (``fit(steps=S, stop_at=...)``); after each piece the amortizer is compared, on the same
``--datasets`` held-out prior-predictive datasets of the fixed structure, with NUTS on the NumPyro twin of
the model (the ``bench`` extra; references cached in ``--nuts-cache``). Reported per snapshot: the steps,
the training wall and CPU seconds so far (the comparison is not counted; CPU seconds are what a machine
shared with other jobs cannot inflate), z median / p90 per level, the sd ratio p10-p90 and whether the
targets are met. Prints markdown; writes ``results.json`` and ``results.md`` atomically to ``--out``
after every snapshot, and the trained amortizer to ``checkpoint.pt`` there at the end; ``--diagnose``
adds the per-dataset verdict (``post.diagnostics()``: how many datasets it calls ok, the worst globals' k).

    python experiments/bench/real_size.py --design gaussian_3level_large [--steps 800] [--datasets 5]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

import amortize as am
from amortize.validate import summarize, to_markdown
from amortize.validate.heldout import against_nuts, heldout_datasets
from amortize.validate.results import machine_info, results_header, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from numpyro_models import twin_reference  # noqa: E402
from real_designs import DESIGNS  # noqa: E402

log = logging.getLogger("real_size")

TWINS = {"gaussian_3level_large": "gaussian_3level", "bernoulli_3level": "logistic_3level"}
TARGETS = {  # design -> (group z median, group z p90, globals z p90)
    "gaussian_3level_large": (0.1, 0.3, 0.3),
    "bernoulli_3level": (0.2, 0.5, 0.3),
}
SD_RATIO = (0.9, 1.1)


def meets(design: str, rows: list[dict[str, Any]]) -> bool:
    """Whether every level meets the design's z targets and every sd ratio p10-p90 lies in 0.9-1.1."""
    med, p90, g90 = TARGETS[design]
    for r in rows:
        if r["level"] == "global":
            if r["z_p90"] > g90:
                return False
        elif r["z_median"] > med or r["z_p90"] > p90:
            return False
        if r["sd_ratio_p10"] < SD_RATIO[0] or r["sd_ratio_p90"] > SD_RATIO[1]:
            return False
    return True


def snapshot_row(design: str, step: int, wall: float, cpu: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: per level z median / p90 and sd ratio p10-p90, and whether the targets are met."""
    out: dict[str, Any] = {"steps": step, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1)}
    for r in rows:
        out[f"{r['level']} z"] = f"{r['z_median']:.3f} / {r['z_p90']:.3f}"
        out[f"{r['level']} sd ratio"] = f"{r['sd_ratio_p10']:.2f}-{r['sd_ratio_p90']:.2f}"
    out["meets targets"] = meets(design, rows)
    return out


def run(args: argparse.Namespace) -> int:
    model, make_sampler, what = DESIGNS[args.design]
    template = make_sampler(args.scale).sample(torch.Generator().manual_seed(args.seed))
    sampler = am.StructureSampler.fixed(template)
    amortizer = am.Amortizer(model, sampler, seed=args.seed)
    sizes = " / ".join(f"{template.size(lvl):,}" for lvl in template.levels)
    datasets = heldout_datasets(amortizer, args.datasets)
    reference = twin_reference(
        TWINS[args.design], num_warmup=args.nuts_warmup, num_samples=args.nuts_samples, cache_dir=args.nuts_cache
    )
    results: dict[str, Any] = {**machine_info(), "args": vars(args), "design": what, "snapshots": []}
    header = results_header(
        results,
        f"{args.design}: {what}; this structure {sizes} groups, {template.n_obs:,} rows; batch {args.batch_size}",
    )
    table: list[dict[str, Any]] = []
    wall = cpu = 0.0
    per = max(1, args.steps // args.snapshots)
    stops = sorted({min(args.steps, per * (i + 1)) for i in range(args.snapshots)} | {args.steps})
    for stop in stops:
        t0, c0 = time.perf_counter(), time.process_time()
        amortizer.fit(steps=args.steps, batch_size=args.batch_size, stop_at=stop, progress=not args.quiet)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        report = against_nuts(
            amortizer, datasets, args.draws, reference=reference, seed=args.seed, diagnose=args.diagnose, k_sets=1
        )
        ok = sum(r["ok"] for r in report.nuts)
        if not report.summary:
            raise SystemExit(f"no NUTS reference passed its checks on {len(datasets)} datasets")
        row = snapshot_row(args.design, amortizer.step, wall, cpu, report.summary)
        if args.diagnose:  # the per-dataset verdict (amortize.verdict) on the same datasets
            row["verdict ok"] = f"{sum(d['ok'] for d in report.diagnostics)} / {len(report.diagnostics)}"
            row["globals k (max)"] = round(max(d["pareto_k"] for d in report.diagnostics), 2)
        table.append(row)
        results["snapshots"].append(
            {
                "steps": amortizer.step,
                "train_wall_s": wall,
                "train_cpu_s": cpu,
                "summary": report.summary,
                "diagnostics": report.diagnostics,
            }
        )
        results["references"] = {"datasets": len(datasets), "passing": ok, "nuts_s": report.nuts_seconds}
        md = [
            header,
            "",
            f"{len(datasets)} held-out datasets of this structure, {ok} with a NumPyro-twin NUTS reference passing its"
            f" checks (NUTS {sum(report.nuts_seconds) / max(1, len(report.nuts_seconds)):.0f} s per dataset, "
            f"amortized {sum(report.amortized_seconds) / max(1, len(report.amortized_seconds)):.2f} s for"
            f" {args.draws} draws); z = |mean - NUTS mean| / NUTS sd, median / p90 per level; targets "
            f"{TARGETS[args.design]} (group median, group p90, globals p90), sd ratio p10-p90 in {SD_RATIO}.",
            "",
            to_markdown(table, list(table[0])),
        ]
        text = "\n".join(md) + "\n"
        write_results(args.out, results, text, default=str)
        print(text, flush=True)
    checkpoint = Path(args.out) / "checkpoint.pt"
    amortizer.save(checkpoint)
    if args.elbo_steps:
        results["elbo"] = elbo_stage(args, model, sampler, datasets, reference, checkpoint)
        e = results["elbo"]
        row = snapshot_row(args.design, args.steps, wall + e["seconds_median"], cpu + e["cpu_median"], e["summary"])
        row["steps"] = f"{args.steps} + {args.elbo_steps} ELBO"
        if args.diagnose:
            row["verdict ok"] = f"{sum(d['ok'] for d in e['diagnostics'])} / {len(e['diagnostics'])}"
            row["globals k (max)"] = round(max(d["pareto_k"] for d in e["diagnostics"]), 2)
        table.append(row)
        text = "\n".join(
            [
                *md[:-1],
                to_markdown(table, list(table[-1])),
                "",
                f"Last row: the trained amortizer fine-tuned on each held-out dataset alone, {args.elbo_steps} steps of"
                f" the whole dataset's ELBO ({args.elbo_particles} particles; `Subsampled` with every outermost"
                f" group, q(globals) the dataset's own Gaussian), {e['seconds_median']:.0f} s (median) per dataset;"
                " its time columns add that median to the NPE training time.",
            ]
        )
        write_results(args.out, results, text + "\n", default=str)
        print(text, flush=True)
    return 0


def elbo_stage(
    args: argparse.Namespace, model: Any, sampler: Any, datasets: list, reference: Any, checkpoint: Path
) -> dict[str, Any]:
    """Per held-out dataset: the trained amortizer (loaded afresh) fine-tuned on that dataset alone by the
    ELBO of the whole dataset, then against NUTS; the rows pooled over the datasets."""
    rows: list[dict[str, Any]] = []
    seconds, cpus, diagnostics = [], [], []
    for i, data in enumerate(datasets):
        a = am.Amortizer.load(checkpoint, model, sampler=sampler)
        t0, c0 = time.perf_counter(), time.process_time()
        source = am.Subsampled(data, groups_per_step=data.size(data.levels[0]))
        a.fit(source=source, steps=args.elbo_steps, num_particles=args.elbo_particles, progress=False)
        seconds.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        report = against_nuts(
            a, [data], args.draws, reference=reference, seed=args.seed, diagnose=args.diagnose, k_sets=1
        )
        rows += [{**r, "dataset": i} for r in report.rows]
        diagnostics += [{**d, "dataset": i} for d in report.diagnostics]
    return {
        "steps": args.elbo_steps,
        "seconds": seconds,
        "seconds_median": sorted(seconds)[len(seconds) // 2],
        "cpu_median": sorted(cpus)[len(cpus) // 2],
        "summary": summarize(rows),
        "diagnostics": diagnostics,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--design", choices=sorted(TWINS), default="gaussian_3level_large")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--snapshots", type=int, default=4)
    p.add_argument("--datasets", type=int, default=5)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--nuts-warmup", type=int, default=1000)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-cache", default="checkpoints/nuts-cache")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the design's group counts (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--elbo-steps", type=int, default=0, help="then, per held-out dataset, ELBO steps on it alone")
    p.add_argument("--elbo-particles", type=int, default=4)
    p.add_argument("--diagnose", action="store_true", help="also the per-dataset verdict (post.diagnostics())")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="checkpoints/bench-real-size")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
