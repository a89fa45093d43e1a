"""Training-step throughput at real design sizes: seconds per NPE step and simulated rows/s, by phase.

One NPE step is simulation (the prior predictive on the design's fixed structure), statistics (the
encoder's pure tensor summaries), guide + loss (the rest of the forward pass: networks, heads, the
guide's run of the model, log q) and backward (gradients and the Adam update). Each phase is timed on
its own, best of ``--repeats`` steps after one warm-up step, for every batch size in ``--batch-sizes``:

* the designs of issue #19, built with the simulator at their real sizes (``--designs``): a 2-level
  Gaussian with varying intercepts and slopes (180 rows, 18 groups); a 3-level Poisson with one row
  per innermost group (354 rows, 9 / 78 / 354); a 3-level Bernoulli with covariates at every level
  (about 2,159 rows, 161 / 1,595, 1-3 rows per mother); a 3-level Gaussian (about 31,022 rows,
  131 / 2,410); and issue #21's crossed design (3,000 students x 1,100 lecturers, ~70,000 rows);
* a sweep of the 2-level Gaussian over ``--sweep-groups`` groups at ``--rows-per-group`` rows each,
  with the growth exponent of step time in groups (a least-squares slope of log seconds on log groups,
  and between the two largest sizes).

Rows/s is ``batch x rows / step seconds``. Timing does not depend on the weights: each amortizer only
runs its pilot (scalers fitted on ``--pilot`` structures). Prints markdown; writes ``results.json`` and
``results.md`` atomically to ``--out`` and, with ``--copy-md``, the markdown to that path too.

    python experiments/bench/real_designs.py [--batch-sizes 64 128] [--designs ...] [--sweep-groups 10 100 ...]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch

import amortize as am
from amortize.checkpoint import atomic_write
from amortize.models import gaussian_2level, gaussian_3level, logistic_3level, poisson_3level, varying_slopes
from amortize.objectives import batch_loss

try:  # the training step's pieces of the batch; without them (amortize 0.3.0) a step is one pass
    from amortize.objectives import chunk_datasets
except ImportError:  # pragma: no cover - timing the release before the pieces, for before/after ratios
    chunk_datasets = None
from amortize.simulate import simulate
from amortize.train import TrainConfig
from amortize.validate.results import machine_info, results_header, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/models
from models.crossed import crossed_gaussian, grid_design  # noqa: E402

log = logging.getLogger("real_designs")

PHASES = ("simulate", "statistics", "guide_loss", "backward")


def _sampler(levels: list[str], groups: dict[str, tuple[int, int]], obs: tuple[int, int], cov: Any = None):
    return am.StructureSampler(levels, groups=groups, obs=obs, covariates=cov)


# name -> (model, structure sampler at the real size, what it stands for); scale < 1 shrinks every count
DESIGNS: dict[str, tuple[Callable, Callable[[float], am.StructureSampler], str]] = {
    "gaussian_2level_slopes": (
        varying_slopes,
        lambda s: _sampler(
            ["group"], {"group": (_n(18, s), _n(18, s))}, (10, 10), {"obs": {"x": {"dist": "uniform", "high": 9}}}
        ),
        "2-level Gaussian, varying intercepts and slopes: 18 groups x 10 rows",
    ),
    "poisson_3level_one_row": (
        poisson_3level,
        lambda s: _sampler(
            ["nation", "region", "county"],
            {"nation": (_n(9, s), _n(9, s)), "region": (6, 11), "county": (2, 7)},
            (1, 1),
            {"obs": {"exposure": {"dist": "uniform", "low": 0.5, "high": 3.0}}},
        ),
        "3-level Poisson, one row per innermost group: 9 / ~78 / ~354",
    ),
    "bernoulli_3level": (
        logistic_3level,
        lambda s: _sampler(
            ["community", "mother"],
            {"community": (_n(161, s), _n(161, s)), "mother": (1, 18)},
            (1, 2),
            {
                "community": {"x_community": {"dist": "bernoulli", "p": 0.4}},
                "mother": {"x_mother": {"dist": "normal"}},
                "obs": {"x_child": {"dist": "normal"}},
            },
        ),
        "3-level Bernoulli, covariates at every level: 161 / ~1,595 mothers of 1-2 rows",
    ),
    "crossed_gaussian_large": (
        crossed_gaussian,
        lambda s: am.StructureSampler.fixed(
            grid_design(_n(3000, s), _n(1100, s), share=min(1.0, 23 / _n(1100, s)), seed=3)
        ),
        "crossed Gaussian (#21): 3,000 students x 1,100 lecturers, ~23 ratings each (~70,000 rows)",
    ),
    "gaussian_3level_large": (
        gaussian_3level,
        lambda s: _sampler(["district", "school"], {"district": (_n(131, s), _n(131, s)), "school": (9, 28)}, (6, 20)),
        "3-level Gaussian: 131 / ~2,410 schools of 6-20 rows (~31,000 rows)",
    ),
}


def poisson_slope(data: am.HierarchicalData) -> None:
    """Issue #19's absurd prior predictive: ``poisson_3level`` (one row per county) with a covariate slope
    ``beta ~ Normal(0, 2)`` on a row covariate ``x`` of values up to 13, so ``exp(beta x)`` overflows for
    a share of the prior."""
    mu = pyro.sample("mu", dist.Normal(1.0, 1.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 2.0))
    taus = [pyro.sample(f"tau_{lvl}", dist.HalfNormal(0.5)) for lvl in ("nation", "region", "county")]
    with pyro.plate("nation", data.size("nation")):
        a = pyro.sample("a_nation", dist.Normal(mu, taus[0]))
    with pyro.plate("region", data.size("region")):
        a = pyro.sample("a_region", dist.Normal(a[..., data.parent_index("region")], taus[1]))
    with pyro.plate("county", data.size("county")):
        a = pyro.sample("a_county", dist.Normal(a[..., data.parent_index("county")], taus[2]))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Poisson((a[..., data.index("county")] + beta * data.x["x"]).exp()), obs=data.y)


def prior_predictive(args: argparse.Namespace) -> dict[str, Any]:
    """The usable share of :func:`poisson_slope`'s prior predictive on the one-row 3-level design (datasets
    whose response is finite), and what training says of it."""
    sampler = _sampler(
        ["nation", "region", "county"],
        {"nation": (_n(9, args.scale), _n(9, args.scale)), "region": (6, 11), "county": (2, 7)},
        (1, 1),
        {"obs": {"x": {"dist": "uniform", "low": 0.0, "high": 13.0}}},
    )
    data = sampler.sample(torch.Generator().manual_seed(args.seed))
    amortizer = am.Amortizer(poisson_slope, data, seed=args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        sim = simulate(poisson_slope, amortizer.structure, data, args.usable)
    kept = sim.data.batch_size or 0
    try:
        amortizer.fit(steps=1, batch_size=min(args.batch_sizes), pilot_structures=1, progress=False, stop_at=0)
        training = "the pilot ran"
    except (am.TrainingError, RuntimeError) as e:  # a RuntimeError: 0.3.0's pilot on batches that lost datasets
        training = f"{type(e).__name__}: {e}"
    return {
        "rows": data.n_obs,
        "requested": args.usable,
        "usable_share": kept / args.usable,
        "dropped": sim.dropped,
        "training": training,
    }


def _n(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def design_data(name: str, scale: float, seed: int) -> am.HierarchicalData:
    """The fixed structure of design ``name`` (its counts times ``scale``)."""
    return DESIGNS[name][1](scale).sample(torch.Generator().manual_seed(seed))


def sweep_data(groups: int, rows_per_group: int, seed: int) -> am.HierarchicalData:
    """A 2-level structure with ``groups`` groups of ``rows_per_group`` rows."""
    sampler = _sampler(["group"], {"group": (groups, groups)}, (rows_per_group, rows_per_group))
    return sampler.sample(torch.Generator().manual_seed(seed))


def time_step(
    amortizer: am.Amortizer,
    data: am.HierarchicalData,
    batch: int,
    repeats: int,
    budget_s: float,
    chunked: bool = True,
) -> dict[str, float]:
    """Seconds per phase of one NPE step on ``data``'s structure, each the fastest of up to ``repeats``
    steps after one warm-up step (fewer once ``budget_s`` is spent). ``chunked``: the batch goes through
    the networks in the training step's pieces (:func:`~amortize.objectives.chunk_datasets`), else whole."""
    cfg = TrainConfig(batch_size=batch)
    guide, structure = amortizer.guide, amortizer.structure
    data = data.to(amortizer.device)

    def clock() -> float:  # a CUDA device runs asynchronously: time its work done
        if amortizer.device.type == "cuda":
            torch.cuda.synchronize(amortizer.device)
        return time.perf_counter()

    opt = amortizer.optimizer or torch.optim.Adam(guide.parameters(), lr=1e-4)
    amortizer.optimizer = opt
    best = {k: math.inf for k in PHASES}
    start, done = clock(), 0
    kept = 0
    while done < repeats + 1:
        t0 = clock()
        sim = simulate(amortizer.model, structure, data, batch)
        took = dict.fromkeys(PHASES, 0.0)
        took["simulate"] = clock() - t0
        opt.zero_grad(set_to_none=True)
        B = sim.data.batch_size or 1
        for piece in (
            sim.split(chunk_datasets(sim.data)) if chunked and chunk_datasets else [sim]
        ):  # as the training step does
            t1 = clock()
            with torch.no_grad():
                guide.encoder.statistics(piece.data)
            t2 = clock()
            loss = batch_loss(amortizer, cfg, piece) * ((piece.data.batch_size or 1) / B)
            t3 = clock()
            loss.backward()
            t4 = clock()
            took["statistics"] += t2 - t1
            took["guide_loss"] += max((t3 - t2) - (t2 - t1), 0.0)
            took["backward"] += t4 - t3
        t5 = clock()
        opt.step()
        took["backward"] += clock() - t5
        kept = B
        if done:  # the first step warms up
            for k in PHASES:
                best[k] = min(best[k], took[k])
        done += 1
        if done > 1 and clock() - start > budget_s:
            break
    total = sum(best.values())
    return {**{f"{k}_s": v for k, v in best.items()}, "step_s": total, "kept": kept}


def measure(
    label: str,
    model: Callable,
    data: am.HierarchicalData,
    batches: list[int],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Rows of the table for one design: one per batch size."""
    amortizer = am.Amortizer(model, data, seed=args.seed, device=args.device)
    amortizer.fit(steps=1, batch_size=min(batches), pilot_structures=args.pilot, progress=False, stop_at=0)
    out = []
    for B in batches:
        t = time_step(amortizer, data, B, args.repeats, args.budget, not args.whole_batch)
        sizes = data.sizes
        row = {
            "design": label,
            "batch": B,
            "rows": data.n_obs,
            "groups": " / ".join(str(sizes[lvl]) for lvl in data.levels),
            "innermost_groups": sizes[data.levels[-1]],
            **t,
            "rows_per_s": B * data.n_obs / t["step_s"],
        }
        out.append(row)
        print(
            f"{label:>24} B={B:<4} {row['groups']:>16} {data.n_obs:>6} rows: {t['step_s']:.4f} s/step"
            f" ({row['rows_per_s']:,.0f} rows/s; sim {t['simulate_s']:.4f}, stats {t['statistics_s']:.4f},"
            f" guide+loss {t['guide_loss_s']:.4f}, backward {t['backward_s']:.4f})",
            flush=True,
        )
    return out


def exponent(rows: list[dict[str, Any]], batch: int) -> tuple[float, float]:
    """Growth exponent of step seconds in innermost groups at ``batch``: the least-squares slope of log
    seconds on log groups, and the slope between the two largest sizes (1 = linear)."""
    pts = [(math.log(r["innermost_groups"]), math.log(r["step_s"])) for r in rows if r["batch"] == batch]
    if len(pts) < 2:
        return math.nan, math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return slope, (y1 - y0) / (x1 - x0)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown of the measured rows."""
    cols = [
        ("design", "design", "s"),
        ("batch", "batch", "d"),
        ("groups", "groups", "s"),
        ("rows", "rows", "d"),
        ("step_s", "s / step", ".4f"),
        ("rows_per_s", "rows/s", ",.0f"),
        ("simulate_s", "simulate s", ".4f"),
        ("statistics_s", "statistics s", ".4f"),
        ("guide_loss_s", "guide+loss s", ".4f"),
        ("backward_s", "backward s", ".4f"),
    ]
    out = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for r in rows:
        out.append("| " + " | ".join(format(r[k], f) for k, _, f in cols) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: one core)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (the training step's device)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--designs", nargs="*", default=list(DESIGNS), help=f"any of {list(DESIGNS)}")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every design's group counts (tests)")
    p.add_argument("--sweep-groups", type=int, nargs="*", default=[10, 100, 1000, 10_000])
    p.add_argument("--sweep-batch", type=int, default=64, help="batch of the sweep")
    p.add_argument("--rows-per-group", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of repeats per row, at most")
    p.add_argument("--pilot", type=int, default=1, help="pilot structures (x batch datasets) fitting the scalers")
    p.add_argument("--usable", type=int, default=2000, help="prior-predictive datasets of the absurd design")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--whole-batch", action="store_true", help="one pass per step (how 0.3.0 ran), not pieces")
    p.add_argument("--out", default="checkpoints/bench-real-designs")
    p.add_argument("--copy-md", default=None, help="also write the markdown here (e.g. experiments/results/...)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet = logging.getLogger("amortize")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # dropped simulations are counted in the table, not logged per step
    try:
        return run(args)
    finally:
        quiet.setLevel(level)


def run(args: argparse.Namespace) -> int:
    """The tables for parsed ``args`` (see :func:`main`)."""
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        **machine_info(torch.device(args.device), threads=True, with_time=True),
        "settings": vars(args),
    }
    print(results["machine"], flush=True)
    designs: list[dict[str, Any]] = []
    for name in args.designs:
        model, _, _ = DESIGNS[name]
        designs += measure(name, model, design_data(name, args.scale, args.seed), args.batch_sizes, args)
    sweep: list[dict[str, Any]] = []
    for G in args.sweep_groups:
        data = sweep_data(G, args.rows_per_group, args.seed)
        sweep += measure(f"gaussian_2level G={G}", gaussian_2level, data, [args.sweep_batch], args)
    fit, last = exponent(sweep, args.sweep_batch)
    pp = prior_predictive(args)
    results.update(designs=designs, sweep=sweep, exponent_fit=fit, exponent_last_two=last, prior_predictive=pp)
    md = [
        results_header(results, "one NPE training step per row, best of the repeats"),
        "",
        "### Designs of issues #19 and #21 at their real sizes",
        "",
        *[f"- `{n}`: {DESIGNS[n][2]}" for n in args.designs],
        "",
        table(designs) if designs else "(none)",
        "",
        f"### Sweep: 2-level Gaussian, {args.rows_per_group} rows per group, batch {args.sweep_batch}",
        "",
        table(sweep) if sweep else "(none)",
        "",
        f"Growth exponent of step time in groups: {fit:.2f} (least squares over the sweep),"
        f" {last:.2f} (two largest sizes); 1 = linear.",
        "",
        "### An absurd prior predictive: the one-row 3-level Poisson with `beta ~ Normal(0, 2)` on x in [0, 13]",
        "",
        f"{100 * pp['usable_share']:.1f}% of {pp['requested']} prior-predictive datasets ({pp['rows']} rows) are usable"
        f" (finite responses; dropped: {pp['dropped'] or 'none'}). Training: {pp['training']}",
        "",
        "Rows/s = batch x rows / seconds per step (simulate + statistics + guide+loss + backward with the"
        " Adam update). Guide+loss is the forward pass less the statistics it computes.",
    ]
    text = "\n".join(md) + "\n"
    print("\n" + text)
    write_results(args.out, results, text, safe=True)
    if args.copy_md:
        Path(args.copy_md).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.copy_md), lambda fh: fh.write(text.encode()))
    print(f"written: {args.out}/results.json, {args.out}/results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
