"""Crossed random effects (persons x items, ``experiments/models/crossed.py``): amortized posteriors trained on
a fixed crossed design, against ground truth.

Arms (``--arms``):

* ``irt``: the 2PL IRT model against the external reference of stan-dev/stat_comp_benchmarks (4 x 250,000
  NUTS draws, 144 parameters) on its own data: per parameter the z-error |mean - ref mean| / ref sd and the
  sd ratio; pass: every z <= 0.3 and every sd ratio in 0.8-1.25;
* ``gaussian``, ``bernoulli``: SBC (200 datasets x 999 draws) and ``--datasets`` held-out prior-predictive
  datasets on a 100 persons x 20 items
  design (2,000 rows) against NUTS on the NumPyro twin of the same model (4 chains, ``experiments/bench/
  numpyro_models.py``; Pyro NUTS where numpyro is not installed): z-error median / p90 per level, sd ratio,
  coverage, and the verdict (``post.diagnostics()``: the joint k for a crossed design);
* ``large``: a 3,000 students x 1,100 lecturers design of ~70,000 rows (23 ratings per student): training
  wall time, the amortized draw time, NUTS time on one held-out dataset, and the z-errors there.

Training wall time is measured for every arm (one process, ``torch.set_num_threads(--threads)``).
Prints markdown; writes ``results.json`` / ``results.md`` atomically under ``--out`` after every arm.

    python experiments/bench/crossed.py [--arms irt gaussian bernoulli large] [--steps 3000] [--datasets 20]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # experiments/models, experiments/bench

from models.crossed import crossed_bernoulli, crossed_gaussian, grid_design, irt_2pl, irt_2pl_data  # noqa: E402

import amortize as am  # noqa: E402
from amortize.validate import sbc, summarize, to_markdown  # noqa: E402
from amortize.validate.heldout import against_nuts, heldout_datasets  # noqa: E402
from amortize.validate.results import machine_info, results_header, write_results  # noqa: E402

ARMS = ["irt", "gaussian", "bernoulli", "large"]
COLUMNS = ["level", "z_median", "z_p90", "sd_ratio_median", "sd_ratio_p10", "sd_ratio_p90", "coverage90", "count"]


def _reference(name: str, args: argparse.Namespace):
    """NUTS on the NumPyro twin (None where numpyro is missing: Pyro NUTS is used)."""
    try:
        from numpyro_models import twin_reference
    except ImportError:
        return None
    return twin_reference(name, args.nuts_warmup, args.nuts_samples, cache_dir=args.nuts_cache or None)


def _train(
    model, data: am.HierarchicalData, args: argparse.Namespace, steps: int, source: Any = None
) -> tuple[am.Amortizer, float]:
    a = am.Amortizer(model, am.StructureSampler.fixed(data), seed=args.seed)
    t0 = time.perf_counter()
    a.fit(steps=steps, batch_size=args.batch, progress=False, source=source)
    return a, time.perf_counter() - t0


def _irt_stage(a: am.Amortizer, data: am.HierarchicalData, ref: dict, seconds: float, args: argparse.Namespace):
    """One stage of the IRT arm: every parameter's draws against the reference means and sds, the verdict."""
    post = a.posterior(data, seed=1)
    t0 = time.perf_counter()
    draws = post.sample(args.draws)
    draw_s = time.perf_counter() - t0
    rows = []
    for name, (mean, sd) in ref.items():
        site, _, idx = name.partition("[")
        d = draws[site] if not idx else draws[site][:, int(idx.rstrip("]")) - 1]
        z = abs(float(d.mean()) - mean) / sd
        row = {"parameter": name, "ref_mean": mean, "ref_sd": sd, "mean": float(d.mean()), "sd": float(d.std())}
        rows.append({**row, "z": z, "sd_ratio": float(d.std()) / sd})
    z = torch.tensor([r["z"] for r in rows])
    ratio = torch.tensor([r["sd_ratio"] for r in rows])
    verdict = post.diagnostics(local_sbc=False)
    return {
        "train_seconds": seconds,
        "steps": a.step,
        "draw_seconds": draw_s,
        "parameters": len(rows),
        "z_median": float(z.median()),
        "z_p90": float(z.quantile(0.9)),
        "z_max": float(z.max()),
        "sd_ratio_min": float(ratio.min()),
        "sd_ratio_max": float(ratio.max()),
        "pass": bool((z <= 0.3).all() and ((ratio >= 0.8) & (ratio <= 1.25)).all()),
        "worst": sorted(rows, key=lambda r: -r["z"])[:8],
        "verdict": {k: verdict[k] for k in ("ok", "reason", "pareto_k")},
    }


def irt_arm(args: argparse.Namespace) -> dict[str, Any]:
    """Truncated NPE on the reference dataset; then (``--irt-elbo-steps``) its ELBO, trained whole
    (``Subsampled``: q(globals) the dataset's own Gaussian, the group heads fine-tuned); both stages
    against the reference."""
    data, ref = irt_2pl_data()
    # HalfCauchy(2) scales make some prior draws of a ~ LogNormal(0, sigma_a) overflow (3.5% of the prior
    # predictive dropped, over the default source's 1%): one observed dataset, so truncated proposals
    a, seconds = _train(irt_2pl, data, args, args.steps, source=am.Truncated(data, rounds=args.rounds))
    out = _irt_stage(a, data, ref, seconds, args)
    out["usable_per_round"] = [r["usable"] for r in a.truncation["rounds"]]
    if args.irt_elbo_steps:
        t0 = time.perf_counter()
        a.fit(source=am.Subsampled(data), steps=args.irt_elbo_steps, num_particles=args.large_particles, progress=False)
        out["then_elbo"] = _irt_stage(a, data, ref, time.perf_counter() - t0, args)
    return out


def heldout_arm(name: str, model, args: argparse.Namespace) -> dict[str, Any]:
    data = grid_design(100, 20, share=1.0, seed=0)
    a, seconds = _train(model, data, args, args.steps)
    sets = heldout_datasets(a, args.datasets)
    nuts = {"num_warmup": args.nuts_warmup, "num_samples": args.nuts_samples, "num_chains": 4}
    report = against_nuts(
        a,
        sets,
        args.draws,
        nuts,
        seed=1,
        nuts_cache=args.nuts_cache or None,
        reference=_reference(name, args),
        diagnose=True,
        correct=True,
    )
    out = {"train_seconds": seconds, "steps": a.step, **report.to_dict()}
    out["by_site"] = summarize(report.rows, by="site") if report.rows else []
    res = sbc(a, num_datasets=args.sbc_datasets, num_samples=args.sbc_draws, seed=args.seed + 1)
    out["sbc"] = {"passed": res.passed, "rows": res.rows, "datasets": res.num_datasets, "draws": res.num_draws}
    out["verdicts"] = [
        {"dataset": d["dataset"], "ok": d.get("ok"), "reason": d.get("reason")} for d in report.diagnostics
    ]
    return out


def _stage(a: am.Amortizer, held: am.HierarchicalData, seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    """One stage of the large arm: its training time, the draw time and (``--large-nuts``) NUTS on ``held``."""
    t0 = time.perf_counter()
    a.posterior(held, seed=1).sample(args.draws)
    out = {"seconds": seconds, "steps": a.step, "draw_seconds": time.perf_counter() - t0}
    if args.large_nuts:
        nuts = {"num_warmup": args.nuts_warmup, "num_samples": args.nuts_samples, "num_chains": 2}
        report = against_nuts(
            a,
            [held],
            args.draws,
            nuts,
            seed=1,
            nuts_cache=args.nuts_cache or None,
            reference=_reference("crossed_gaussian", args),
            diagnose=True,
        )
        out.update(report.to_dict())
    return out


def large_arm(args: argparse.Namespace) -> dict[str, Any]:
    """NPE on the fixed 70,000-row design; then (``--large-elbo-steps``) the ELBO of one held-out dataset,
    trained whole (``Subsampled``: q(globals) its own Gaussian, the group heads fine-tuned). Each stage
    timed and, with ``--large-nuts``, against NUTS on that dataset (computed once, cached)."""
    persons, items, per_person = args.large_design
    data = grid_design(persons, items, share=per_person / items, seed=3)
    a, seconds = _train(crossed_gaussian, data, args, args.large_steps)
    (held,) = heldout_datasets(a, 1)
    out = {"n_rows": data.n_obs, "persons": data.size("person"), "items": data.size("item")}
    out["stages"] = {"npe": _stage(a, held, seconds, args)}
    if args.large_elbo_steps:
        t0 = time.perf_counter()
        source = am.Subsampled(held)
        a.fit(source=source, steps=args.large_elbo_steps, num_particles=args.large_particles, progress=False)
        out["stages"]["then elbo"] = _stage(a, held, time.perf_counter() - t0, args)
    return out


def markdown(results: dict[str, Any]) -> str:
    md = [results_header(results) + "\n"]
    arms = results["arms"]
    if "irt" in arms:
        e = arms["irt"]

        def irt_result(e: dict[str, Any]) -> str:
            return (
                f"z median {e['z_median']:.3f}, p90 {e['z_p90']:.3f}, max {e['z_max']:.3f}; sd ratio"
                f" {e['sd_ratio_min']:.2f}-{e['sd_ratio_max']:.2f}; target (every z <= 0.3, sd ratio 0.8-1.25)"
                f" {'met' if e['pass'] else 'NOT met'}. Verdict: ok {e['verdict']['ok']} ({e['verdict']['reason']};"
                f" joint k {e['verdict']['pareto_k']:.2f}).\n\n"
                + to_markdown(e["worst"], ["parameter", "ref_mean", "ref_sd", "mean", "sd", "z", "sd_ratio"])
            )

        text = (
            f"### 2PL IRT vs stat_comp_benchmarks ({e['parameters']} parameters)\n\n"
            f"Trained {e['steps']} x {results['args']['batch']} NPE steps in {e['train_seconds']:.0f} s; "
            f"{results['args']['draws']} draws in {e['draw_seconds'] * 1000:.0f} ms; truncated proposals, usable share"
            f" of the simulations per round {', '.join(f'{u:.3f}' for u in e['usable_per_round'])}. " + irt_result(e)
        )
        if "then_elbo" in e:
            f = e["then_elbo"]
            text += (
                f"\n\n**Then the ELBO of the dataset, trained whole** ({f['steps']} steps,"
                f" {results['args']['large_particles']} particles, {f['train_seconds']:.0f} s): " + irt_result(f)
            )
        md.append(text)
    for name in ("gaussian", "bernoulli"):
        if name in arms:
            e = arms[name]
            ok = sum(bool(v["ok"]) for v in e["verdicts"])
            md.append(
                f"### crossed {name}, 100 persons x 20 items (2,000 rows), {len(e['nuts'])} held-out datasets\n\n"
                f"Trained {e['steps']} steps in {e['train_seconds']:.0f} s; NUTS "
                f"{e['nuts_seconds_per_dataset'] or 0:.1f} s, amortized {e['amortized_seconds_per_dataset'] or 0:.3f}"
                f" s per dataset; NUTS passed its checks on {sum(bool(r.get('ok')) for r in e['nuts'])}; verdict ok on"
                f" {ok} of {len(e['verdicts'])}. SBC ({e['sbc']['datasets']} x {e['sbc']['draws']}, every scalar"
                f" quantity, family-wise 95% band): {'PASS' if e['sbc']['passed'] else 'FAIL'}"
                f" (failing: {[r['quantity'] for r in e['sbc']['rows'] if not r['passed']] or 'none'}).\n\n"
                + (to_markdown(e["summary"], COLUMNS) if e["summary"] else "")
            )
            if e.get("corrected"):
                applied = sum(c["applied"] for c in e["corrected"])
                md.append(
                    f"With `sample(correct=True)` (the joint PSIS correction): applied on {applied} of"
                    f" {len(e['corrected'])} datasets (elsewhere the draws are the uncorrected ones)\n\n"
                    + to_markdown(e["corrected_summary"], COLUMNS)
                )
    if "large" in arms:
        e = arms["large"]
        parts = [f"### large: {e['persons']:,} students x {e['items']:,} lecturers, {e['n_rows']:,} rows"]
        for name, st in e["stages"].items():
            nuts = f"; NUTS {st['nuts_seconds_per_dataset']:.0f} s on the held-out dataset" if st.get("nuts") else ""
            verdict = ""
            if st.get("diagnostics"):
                v = st["diagnostics"][0]
                verdict = f"; verdict ok {v.get('ok')} ({v.get('reason')})"
            parts.append(
                f"**{name}**: {st['steps']} steps in {st['seconds'] / 60:.1f} min; {results['args']['draws']} draws in"
                f" {st['draw_seconds']:.2f} s{nuts}{verdict}.\n\n"
                + (to_markdown(st["summary"], COLUMNS) if st.get("summary") else "")
            )
        md.append("\n\n".join(parts))
    return "\n\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--large-steps", type=int, default=1500)
    p.add_argument(
        "--large-design",
        nargs=3,
        type=int,
        default=[3000, 1100, 23],
        metavar=("PERSONS", "ITEMS", "PER_PERSON"),
        help="the large arm's design: persons, items, expected rows per person",
    )
    p.add_argument("--large-nuts", action="store_true", help="NUTS on the large design too (long)")
    p.add_argument(
        "--large-elbo-steps", type=int, default=0, help="then ELBO steps on the held-out dataset, trained whole"
    )
    p.add_argument("--irt-elbo-steps", type=int, default=0, help="then ELBO steps on the IRT dataset, trained whole")
    p.add_argument("--large-particles", type=int, default=4, help="ELBO particles per step of the ELBO stages")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="truncation rounds of the IRT arm")
    p.add_argument("--datasets", type=int, default=20)
    p.add_argument("--draws", type=int, default=4000)
    p.add_argument("--sbc-datasets", type=int, default=200)
    p.add_argument("--sbc-draws", type=int, default=999)
    p.add_argument("--nuts-warmup", type=int, default=1000)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-cache", default="checkpoints/nuts-cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints/bench-crossed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {**machine_info(threads=True), "version": am.__version__, "args": vars(args), "arms": {}}
    for arm in args.arms:
        if arm == "irt":
            results["arms"][arm] = irt_arm(args)
        elif arm == "large":
            results["arms"][arm] = large_arm(args)
        else:
            results["arms"][arm] = heldout_arm(
                f"crossed_{arm}", {"gaussian": crossed_gaussian, "bernoulli": crossed_bernoulli}[arm], args
            )
        md = markdown(results)
        write_results(args.out, results, md, default=str, safe=True)
        print(md.split("\n\n### ")[-1], flush=True)
    print(f"written: {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
