"""Several latents per group as one joint posterior (issue #19): on a sleepstudy-like design (18 subjects
x days 0..9, not centred; intercept and slope as two sites of one plate, experiments/sleepstudy_slopes.py),
train with library defaults, then compare with NUTS on the same data: the per-subject posterior
correlation of (intercept, slope), the marginals (mean error in NUTS sds, sd ratio), Pareto k.

Prints a table; writes ``results.json`` and ``results.md`` under ``--out`` and, with ``--md``, the markdown there too.

    python experiments/bench/joint_groups.py [--steps 2000] [--out checkpoints/joint_groups] [--md FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch

import amortize as am
from amortize.checkpoint import atomic_write
from amortize.validate.nuts import cached_nuts
from amortize.validate.results import machine_info, results_header, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sleepstudy_slopes import sleepstudy_two_sites  # noqa: E402

TRUTH = {"mu_a": 251.4, "mu_b": 10.5, "tau_a": 24.7, "tau_b": 5.9, "sigma": 25.6}  # lme4's sleepstudy fit


def design(seed: int) -> am.HierarchicalData:
    """18 subjects x days 0..9, the response simulated from the model at sleepstudy-like globals."""
    frame = pd.DataFrame({"subject": np.repeat(np.arange(18), 10), "day": np.tile(np.arange(10.0), 18)})
    frame["y"] = 0.0
    skeleton = am.HierarchicalData.from_frame(frame, ["subject"], "y", {"obs": ["day"]})
    pyro.set_rng_seed(seed)
    cond = {k: torch.tensor(v) for k, v in TRUTH.items()}
    trace = pyro.poutine.trace(pyro.poutine.condition(sleepstudy_two_sites, cond)).get_trace(skeleton)
    frame["y"] = trace.nodes["y"]["value"].detach().numpy()
    return am.HierarchicalData.from_frame(frame, ["subject"], "y", {"obs": ["day"]})


def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column correlation of draws ``[n, G]``."""
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).mean(0) / (a.std(0) * b.std(0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--draws", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints/joint_groups")
    p.add_argument("--md", default=None)
    p.add_argument("--label", default=am.__version__)
    args = p.parse_args(argv)
    data = design(args.seed)
    t0 = time.perf_counter()
    amortizer = am.Amortizer(sleepstudy_two_sites, data, seed=args.seed)
    amortizer.fit(steps=args.steps, progress=False)
    train_s = time.perf_counter() - t0
    ref = cached_nuts(sleepstudy_two_sites, data, "checkpoints/nuts_cache", num_warmup=400, num_samples=500)
    post = amortizer.posterior(data)
    draws = {k: v.detach().numpy() for k, v in post.sample(args.draws, seed=1).items()}
    nuts = {k: v.detach().numpy() for k, v in ref.samples.items()}
    c_q, c_n = corr(draws["a"], draws["b"]), corr(nuts["a"], nuts["b"])
    z = {s: np.abs(draws[s].mean(0) - nuts[s].mean(0)) / nuts[s].std(0) for s in ("a", "b")}
    ratio = {s: draws[s].std(0) / nuts[s].std(0) for s in ("a", "b")}
    fit_q = draws["a"] + 9.0 * draws["b"]  # the fitted response at the last day, per subject
    fit_n = nuts["a"] + 9.0 * nuts["b"]
    diag = post.diagnostics(num_samples=args.draws)
    row = {
        "label": args.label,
        "steps": args.steps,
        "train_s": round(train_s, 1),
        "corr_nuts_median": float(np.median(c_n)),
        "corr_amortized_median": float(np.median(c_q)),
        "corr_abs_error_median": float(np.median(np.abs(c_q - c_n))),
        "corr_abs_error_max": float(np.max(np.abs(c_q - c_n))),
        "z_median": {s: float(np.median(v)) for s, v in z.items()},
        "z_max": {s: float(np.max(v)) for s, v in z.items()},
        "sd_ratio_median": {s: float(np.median(v)) for s, v in ratio.items()},
        "last_day_sd_ratio_median": float(np.median(fit_q.std(0) / fit_n.std(0))),
        "pareto_k": float(diag["pareto_k"]),
        "nuts_ok": bool(ref.ok),
    }
    out = Path(args.out)
    info = machine_info()
    lines = [
        results_header(info, f"NUTS {ref.seconds:.0f} s, ok {ref.ok}"),
        "",
        "| build | steps | train s | corr NUTS (median) | corr amortized | abs error median / max | "
        "z a / b median (max) | sd ratio a / b | last-day sd ratio | Pareto k |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---:|",
        f"| {row['label']} | {row['steps']} | {row['train_s']} | {row['corr_nuts_median']:.3f} | "
        f"{row['corr_amortized_median']:.3f} | {row['corr_abs_error_median']:.3f} / {row['corr_abs_error_max']:.3f} | "
        f"{row['z_median']['a']:.2f} / {row['z_median']['b']:.2f} "
        f"({row['z_max']['a']:.2f} / {row['z_max']['b']:.2f}) | "
        f"{row['sd_ratio_median']['a']:.2f} / {row['sd_ratio_median']['b']:.2f} | "
        f"{row['last_day_sd_ratio_median']:.2f} | {row['pareto_k']:.2f} |",
    ]
    markdown = "\n".join(lines) + "\n"
    write_results(out / args.label, {**info, **row}, markdown)
    print(markdown, end="")
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.md), lambda fh: fh.write(markdown.encode()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
