"""Models the library does not ship (``experiments/models/unshipped.py``, one config each in ``experiments/``)
against Pyro NUTS on the same Pyro model: each trained with library defaults (NPE) on its config's training
structures for ``--steps`` x ``--batch-size`` (wall time measured), then on ``--datasets`` held-out
prior-predictive datasets (seeded, :func:`~amortize.validate.heldout.heldout_datasets`) ``--draws``
amortized draws against NUTS (:func:`~amortize.validate.heldout.against_nuts`, which runs
:func:`~amortize.validate.nuts.cached_nuts`): z-error median / p90 per level and for the globals, sd ratio
p10-p90, 90% coverage, NUTS runs failing their R-hat / ESS / divergence checks (left out of the rows), and
the per-dataset trust verdict (``post.diagnostics()``: ``ok`` and ``reason``). A model that fails (NaN,
crash, refusal) is a row with its error. Prints the tables; writes JSON and markdown atomically after
every model.

    python experiments/bench/unshipped.py [--models studentt_dof ...] [--steps 2000] [--datasets 8]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import amortize as am
from amortize.config import config_dir, config_source, load_config
from amortize.experiment import build_sampler
from amortize.modelspec import resolve_model
from amortize.validate import summarize, to_markdown
from amortize.validate.heldout import against_nuts, heldout_datasets
from amortize.validate.results import machine_info, results_header, write_results

EXPERIMENTS = Path(__file__).resolve().parents[1]
MODELS = [
    "studentt_dof",
    "negbin_exposure",
    "gamma_log",
    "binomial_trials",
    "studentt_prior",
    "lognormal_scale",
    "negbin_3level",
]
COLUMNS = ["level", "z_median", "z_p90", "sd_ratio_median", "sd_ratio_p10", "sd_ratio_p90", "coverage90", "count"]
SITE_COLUMNS = ["site", "count", "z_median", "z_p90", "sd_ratio_median", "coverage90"]


def _verdicts(diagnostics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset: the verdict's ``ok``, ``reason``, the globals' Pareto k, ESS ratio and weighted mean shift."""
    keys = ("reason", "pareto_k", "ess_ratio")
    return [
        {"dataset": d["dataset"], "ok": bool(d.get("ok")), **{k: d.get(k) for k in keys}, "shift": d.get("shift")}
        for d in diagnostics
    ]


def run_model(name: str, args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    """Train ``name`` from its config and compare it with NUTS; the error (type, message, where) if it fails."""
    overrides = [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}"]
    cfg = load_config(EXPERIMENTS / f"{name}.yaml", overrides)
    model = resolve_model(cfg.model, config_dir(cfg), config_source(cfg))
    entry: dict[str, Any] = {"config": f"experiments/{name}.yaml", "steps": 0, "error": None}
    stage = "train"
    try:
        a = am.Amortizer(model, build_sampler(cfg), hidden=cfg.network.hidden, seed=args.seed)
        t0 = time.perf_counter()
        a.fit(config=cfg.train, progress=progress, checkpoint_path=f"{args.out}/{name}.pt")
        entry["train_seconds"] = time.perf_counter() - t0
        entry["steps"] = a.step
        losses = [h["loss"] for h in a.history]
        entry["final_loss"] = losses[-1] if losses else None
        entry["losses_finite"] = all(math.isfinite(x) for x in losses)
        entry["skipped_steps"] = a.history[-1].get("skipped", 0) if a.history else 0
        stage = "held-out comparison"
        data = heldout_datasets(a, args.datasets)
        entry["heldout_sizes"] = [{**d.sizes, "rows": d.n_obs} for d in data]
        nuts = {"num_warmup": args.nuts_warmup, "num_samples": args.nuts_samples, "num_chains": 2}
        report = against_nuts(
            a, data, args.draws, nuts, seed=1, progress=progress, nuts_cache=args.nuts_cache or None, diagnose=True
        )
    except Exception as e:  # noqa: BLE001 - a model that fails is a finding, recorded with its error
        entry["error"] = {"stage": stage, "type": type(e).__name__, "message": str(e)[:2000]}
        entry["traceback"] = traceback.format_exc()[-4000:]
        return entry
    entry.update(report.to_dict())
    entry["by_site"] = summarize(report.rows, by="site") if report.rows else []
    entry["verdicts"] = _verdicts(report.diagnostics)
    entry["nuts_failed"] = [
        {"dataset": r["dataset"], "r_hat": r.get("r_hat"), "divergences": r.get("divergences")}
        for r in report.nuts
        if not r.get("ok")
    ]
    return entry


def model_markdown(name: str, e: dict[str, Any], args: argparse.Namespace) -> str:
    """One model's section: training, NUTS checks, the per-level and per-site tables, the verdicts."""
    md = [f"### {name} (`{e['config']}`)\n"]
    if e.get("train_seconds") is not None:
        md.append(
            f"Training: {e['steps']} NPE steps x {args.batch_size} in {e['train_seconds']:.0f} s; losses finite: "
            f"{e['losses_finite']}; skipped steps: {e['skipped_steps']}; final loss {e['final_loss']:.3f}.\n"
        )
    if e["error"]:
        err = e["error"]
        md.append(f"**FAILED** at {err['stage']}: `{err['type']}: {err['message'][:600]}`\n")
        return "\n".join(md)
    n, bad = len(e["nuts"]), e["nuts_failed"]
    worst = [
        f"dataset {b['dataset']} (max R-hat {max((b['r_hat'] or {0: float('nan')}).values()):.3f}, "
        f"{b['divergences']} divergences)"
        for b in bad
    ]
    md.append(
        f"{n} held-out datasets; NUTS 2 x ({args.nuts_warmup} warm-up + {args.nuts_samples}) failed its checks on "
        f"{len(bad)}{': ' + ', '.join(worst) if worst else ''}; NUTS {e['nuts_seconds_per_dataset'] or 0:.1f} s, "
        f"amortized {e['amortized_seconds_per_dataset'] or 0:.3f} s per dataset.\n"
    )
    md.append(to_markdown(e["summary"], COLUMNS) if e["summary"] else "(no NUTS reference passed its checks)")
    if e["by_site"]:
        md.append("\n" + to_markdown(e["by_site"], SITE_COLUMNS))
    v = e["verdicts"]
    md.append(f"\nVerdict (`post.diagnostics()`): ok on {sum(x['ok'] for x in v)} of {len(v)} datasets.\n")
    md.append(to_markdown(v, ["dataset", "ok", "pareto_k", "reason"]))
    return "\n".join(md)


def overview(results: dict[str, Any]) -> str:
    """One row per model and level: z median / p90, sd ratio p10-p90, coverage, NUTS passed, verdict ok."""
    rows = []
    for name, e in results["models"].items():
        if e["error"]:
            err = e["error"]
            rows.append({"model": name, "steps": e["steps"], "level": f"FAILED ({err['stage']}: {err['type']})"})
            continue
        passed = f"{len(e['nuts']) - len(e['nuts_failed'])} of {len(e['nuts'])}"
        ok = f"{sum(x['ok'] for x in e['verdicts'])} of {len(e['verdicts'])}"
        for i, s in enumerate(e["summary"] or [{"level": "(no reference passed)"}]):
            first = i == 0
            rows.append(
                {
                    "model": name if first else "",
                    "steps": e["steps"] if first else "",
                    "train_s": round(e["train_seconds"]) if first else "",
                    "NUTS passed": passed if first else "",
                    "verdict ok": ok if first else "",
                    "level": s["level"] or "global",
                    "z median / p90": f"{s['z_median']:.3f} / {s['z_p90']:.3f}" if "z_median" in s else "",
                    "sd ratio p10-p90": f"{s['sd_ratio_p10']:.3f}-{s['sd_ratio_p90']:.3f}" if "z_median" in s else "",
                    "coverage90": s.get("coverage90"),
                }
            )
    cols = ["model", "steps", "train_s", "NUTS passed", "verdict ok", "level"]
    return to_markdown(rows, cols + ["z median / p90", "sd ratio p10-p90", "coverage90"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, metavar="MODEL")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--datasets", type=int, default=8, help="held-out datasets against NUTS")
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=500)
    p.add_argument("--nuts-cache", default="checkpoints/nuts-cache", help="reuse NUTS references ('': never)")
    p.add_argument("--out", default="checkpoints/bench-unshipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    progress = not args.quiet and not os.environ.get("CI")
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {**machine_info(), "args": vars(args), "models": {}}
    for name in args.models:
        results["models"][name] = run_model(name, args, progress)
        sections = [model_markdown(n, e, args) for n, e in results["models"].items()]
        md = "\n\n".join([results_header(results) + "\n", overview(results), *sections]) + "\n"
        write_results(args.out, results, md, default=str, safe=True)
        print(sections[-1] + "\n", flush=True)
    print(overview(results))
    print(f"\nwritten: {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
