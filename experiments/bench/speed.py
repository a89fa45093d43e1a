"""Speed against what a user would otherwise run: the amortized posterior of the 2-level Gaussian model
(``amortize.models.gaussian_2level``) against NumPyro NUTS, Pyro NUTS and Pyro SVI with an AutoNormal
guide, on the SAME datasets in ONE run, with accuracy against the NumPyro NUTS reference.

For each size in ``--groups`` (default 50 and 10^4 groups, ``--obs`` 5-15 rows per group, about 10),
``--datasets`` datasets are simulated from the model's prior predictive (each 50-group dataset on its
own ragged structure; the large size on one fixed structure, as one big study re-analysed). Timed per
dataset, wall clock:

* amortized: ``amortizer.posterior(data).sample(1000)`` after one warm-up call (median of
  ``--repeats`` calls). Sizes inside the training range of ``models.SAMPLERS['gaussian_2level']``
  (10-50 groups) use ``--checkpoint``, or an amortizer trained here for ``--steps`` steps when none is
  given; any other size gets ``--large-checkpoint`` (e.g. the same count-aware amortizer, outside its
  range: flagged) or an amortizer trained here on its fixed structure (``StructureSampler.fixed``) for
  ``--large-steps`` steps of ``--large-batch-size`` datasets.
  Training time is reported separately, never in the per-dataset time;
* NumPyro NUTS (the ``bench`` extra: ``experiments/bench/numpyro_models.py``, same math): 2 chains
  run one after the other, 500 warm-up + 1000 draws each (reduced above ``--large-groups`` groups, see
  ``--large-nuts-*``), non-centered retry when the centered run fails its checks (as ``run_nuts``);
  compile+run and run alone (compile = JAX's own trace/compile spans);
* Pyro NUTS (:func:`amortize.validate.nuts.run_nuts`, same settings, JIT), up to ``--large-groups`` groups;
* Pyro SVI, AutoNormal guide, ``--svi-steps`` Adam steps per dataset (rate ``--svi-lr`` decayed to a
  tenth), then 1000 draws.

Accuracy of each against NumPyro NUTS: z = |mean - ref mean| / ref sd and sd / ref sd per element,
pooled per level over the datasets (:func:`amortize.validate.summarize`). Break-even: training
seconds / (method seconds - amortized seconds), the number of datasets after which training has
paid for itself. Prints markdown; writes ``results.json`` and ``results.md`` atomically to ``--out``.

Run single-threaded for a like-for-like comparison (torch and XLA one thread each)::

    OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        python experiments/bench/speed.py [--groups 50 10000] [--datasets 3] [--checkpoint CK.pt]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import amortize as am
from amortize import models
from amortize.structure import trace_structure
from amortize.validate import compare, summarize, to_markdown
from amortize.validate.nuts import run_nuts
from amortize.validate.results import machine_info, results_header, write_results

MODEL = models.gaussian_2level
SITES = ("mu", "tau", "sigma", "theta")
LEVELS = {"mu": None, "tau": None, "sigma": None, "theta": "group"}
METHODS = ("amortized", "numpyro_nuts", "pyro_nuts", "pyro_svi")
# issue #3 accuracy of the 2-level model ("the core issue's accuracy") and issue #7's speed targets
CORE = {"global_z_median": 0.15, "global_z_p90": 0.6, "group_z_median": 0.08, "group_z_p90": 0.25}
CORE_SD_RATIO = (0.85, 1.3)

log = logging.getLogger("speed")


def structure(groups: int, obs: tuple[int, int], seed: int) -> am.HierarchicalData:
    """A ragged one-level structure: ``groups`` groups of ``obs[0]``..``obs[1]`` rows (no response)."""
    sampler = am.StructureSampler(["group"], groups={"group": (groups, groups)}, obs=obs)
    return sampler.sample(torch.Generator().manual_seed(seed))


def simulate_response(data: am.HierarchicalData, seed: int) -> am.HierarchicalData:
    """``data`` with a response drawn from the model's prior predictive (finite draws only)."""
    st = trace_structure(MODEL, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while True:
            sim = am.simulate(MODEL, st, data, 1)
            if sim.data.batch_size:
                return data.with_response(sim.data.y[0])


def datasets_for(groups: int, args: argparse.Namespace, fixed: bool, seed: int) -> list[am.HierarchicalData]:
    """``args.datasets`` datasets of ``groups`` groups: one structure each, or one shared (``fixed``)."""
    shared = structure(groups, tuple(args.obs), seed) if fixed else None
    out = []
    for i in range(args.datasets):
        st = shared if shared is not None else structure(groups, tuple(args.obs), seed + 1 + i)
        out.append(simulate_response(st, seed + 100 + i))
    return out


def in_range(groups: int, obs: tuple[int, int]) -> bool:
    """Whether datasets of this size are inside the training range of the shipped 2-level sampler."""
    r = models.SAMPLERS["gaussian_2level"]().ranges()
    return r["group"][0] <= groups <= r["group"][1] and r["obs"][0] <= obs[0] and obs[1] <= r["obs"][1]


def shared_amortizer(args: argparse.Namespace) -> tuple[am.Amortizer, dict[str, Any]]:
    """The amortizer for sizes inside the shipped training range: ``--checkpoint``, or trained here."""
    sampler = models.SAMPLERS["gaussian_2level"]()
    if args.checkpoint:
        return loaded_amortizer(args.checkpoint)
    amortizer = am.Amortizer(MODEL, sampler, seed=args.seed)
    t0 = time.perf_counter()
    amortizer.fit(steps=args.steps, batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - t0
    how = (
        f"NO checkpoint given: trained here briefly, {args.steps} NPE steps x {args.batch_size} datasets on "
        "SAMPLERS['gaussian_2level'] (10-50 groups, 5-30 rows); a fully trained checkpoint is more accurate"
    )
    return amortizer, {"how": how, "train_seconds": seconds, "measured": True, "steps": args.steps}


def loaded_amortizer(path: str) -> tuple[am.Amortizer, dict[str, Any]]:
    """A trained checkpoint; its training time estimated from its logged rate."""
    amortizer = am.Amortizer.load(path, MODEL, models.SAMPLERS["gaussian_2level"]())
    cfg = amortizer.config
    last = amortizer.history[-1] if amortizer.history else {}
    rate = last.get("datasets_per_s")
    est = amortizer.step * cfg.batch_size / rate if rate else float("nan")
    how = (
        f"checkpoint {path} (step {amortizer.step}, batch {cfg.batch_size}, {cfg.objective}); "
        f"training time estimated from its logged rate"
    )
    return amortizer, {"how": how, "train_seconds": est, "measured": False, "steps": amortizer.step}


def fixed_amortizer(data: am.HierarchicalData, args: argparse.Namespace) -> tuple[am.Amortizer, dict[str, Any]]:
    """An amortizer trained here on ``data``'s structure only (``StructureSampler.fixed``)."""
    amortizer = am.Amortizer(MODEL, am.StructureSampler.fixed(data), seed=args.seed)
    t0 = time.perf_counter()
    amortizer.fit(
        steps=args.large_steps,
        batch_size=args.large_batch_size,
        pilot_structures=args.large_pilot,
        warmup=min(100, max(1, args.large_steps // 10)),
        progress=False,
    )
    seconds = time.perf_counter() - t0
    how = (
        f"trained here on the fixed structure ({data.size('group')} groups, {data.n_obs} rows): "
        f"{args.large_steps} NPE steps x {args.large_batch_size} datasets"
    )
    return amortizer, {"how": how, "train_seconds": seconds, "measured": True, "steps": args.large_steps}


_COMPILED: list[Any] = []


def compiled_kernel() -> Any:
    """The drawing kernel compiled once per run (``Amortizer.compile`` does the same)."""
    if not _COMPILED:
        from amortize.guide import product_draw

        _COMPILED.append(torch.compile(product_draw, dynamic=True))
    return _COMPILED[0]


def time_amortized(
    amortizer: am.Amortizer, data: am.HierarchicalData, draws: int, repeats: int, seed: int
) -> tuple[dict[str, torch.Tensor], float]:
    """Draws and the median wall seconds of ``amortizer.posterior(data).sample(draws)`` over ``repeats`` calls."""
    times, out = [], None
    for r in range(max(1, repeats)):
        t0 = time.perf_counter()
        q = amortizer.posterior(data).sample(draws, seed=seed + r)
        times.append(time.perf_counter() - t0)
        out = out if out is not None else q
    return out, statistics.median(times)


def time_batched(
    amortizer: am.Amortizer, data: am.HierarchicalData, draws: int, batch: int, repeats: int, seed: int
) -> float:
    """Median wall seconds PER DATASET of one ``posterior(...).sample(draws)`` call on ``batch`` datasets
    of ``data``'s structure (responses from the prior predictive, stacked as ``y [batch, N]``): the
    amortized cost when many datasets of one design are analysed, e.g. one survey repeated."""
    st = trace_structure(MODEL, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sim = am.simulate(MODEL, st, data.with_response(None), batch)
    stacked = sim.data
    amortizer.posterior(stacked).sample(10)  # warm-up
    times = []
    for r in range(max(1, repeats)):
        t0 = time.perf_counter()
        amortizer.posterior(stacked).sample(draws, seed=seed + r)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / stacked.batch_size


def fit_svi(data: am.HierarchicalData, steps: int, lr: float, draws: int, seed: int) -> dict[str, torch.Tensor]:
    """Pyro SVI with an AutoNormal guide fitted to ``data`` (Adam, learning rate decayed from ``lr`` to
    ``lr / 10``), then ``draws`` joint draws from the guide."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(MODEL)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / max(1, steps))})  # lr decays to lr / 10
    svi = SVI(MODEL, guide, optim, Trace_ELBO())
    for _ in range(steps):
        svi.step(data)
    with torch.no_grad():
        q = Predictive(guide, num_samples=draws, return_sites=list(SITES), parallel=True)(data)
    shapes = {"mu": (), "tau": (), "sigma": (), "theta": (data.size("group"),)}
    return {k: q[k].reshape(draws, *shapes[k]) for k in SITES}


def accuracy(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Pooled accuracy of comparison rows: z median/p90 and sd ratio median, globals and groups."""
    out: dict[str, float | None] = {}
    by = {s["level"]: s for s in summarize(rows)} if rows else {}
    for level, key in (("global", "global"), ("group", "group")):
        s = by.get(level)
        out[f"{key}_z_median"] = s["z_median"] if s else None
        out[f"{key}_z_p90"] = s["z_p90"] if s else None
        out[f"{key}_sd_ratio_median"] = s["sd_ratio_median"] if s else None
    return out


def break_even(train_s: float, method_s: float | None, amortized_s: float) -> float | None:
    """Datasets after which training pays for itself: train / (method - amortized); inf if never."""
    if method_s is None or not math.isfinite(train_s):
        return None
    gain = method_s - amortized_s
    return math.ceil(train_s / gain) if gain > 0 else math.inf


def run_size(
    groups: int, index: int, args: argparse.Namespace, shared: tuple[am.Amortizer, dict[str, Any]] | None
) -> dict[str, Any]:
    """Every method on the datasets of one size; returns the JSON entry of that size."""
    from numpyro_models import run_numpyro_nuts

    large = groups > args.large_groups
    fixed = not in_range(groups, tuple(args.obs))
    seed = args.seed + 1000 * (index + 1)
    datasets = datasets_for(groups, args, fixed, seed)
    if fixed and args.large_checkpoint:
        amortizer, training = loaded_amortizer(args.large_checkpoint)
    elif fixed:
        amortizer, training = fixed_amortizer(datasets[0], args)
    else:
        if shared is None:
            raise RuntimeError("no shared amortizer for an in-range size")
        amortizer, training = shared
    nuts_cfg = {
        "num_warmup": args.nuts_warmup,
        "num_samples": args.nuts_draws,
        "num_chains": 2,
        "reparam": args.nuts_reparam,
    }
    if large:
        nuts_cfg.update(
            num_warmup=args.large_nuts_warmup, num_samples=args.large_nuts_draws, reparam=args.large_nuts_reparam
        )
    full_iters = 2 * (args.nuts_warmup + args.nuts_draws)
    iters = nuts_cfg["num_chains"] * (nuts_cfg["num_warmup"] + nuts_cfg["num_samples"])
    run_pyro_nuts = not large and not args.skip_pyro_nuts

    amortizer.posterior(datasets[0]).sample(10)  # warm-up: first-call overheads are not inference time
    per: list[dict[str, Any]] = []
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for i, data in enumerate(datasets):
        rec: dict[str, Any] = {"dataset": i, "groups": data.size("group"), "rows": data.n_obs}
        q, rec["amortized_s"] = time_amortized(amortizer, data, args.draws, args.repeats, seed=i)
        rec["range_flags"] = amortizer.posterior(data).range_flags()
        if args.batch > 1 and not large:
            rec["amortized_batched_s"] = time_batched(amortizer, data, args.draws, args.batch, args.repeats, seed=i)
        if args.compile:  # the same calls with the compiled drawing kernel (Amortizer.compile)
            eager = amortizer.guide.draw_kernel
            amortizer.guide.draw_kernel = compiled_kernel()
            try:
                amortizer.posterior(data).sample(args.draws)  # compiles on first use of a shape
                _, rec["amortized_compiled_s"] = time_amortized(amortizer, data, args.draws, args.repeats, seed=i)
                if args.batch > 1 and not large:
                    rec["amortized_batched_compiled_s"] = time_batched(
                        amortizer, data, args.draws, args.batch, args.repeats, seed=i
                    )
            finally:
                amortizer.guide.draw_kernel = eager

        t0 = time.perf_counter()
        ref = run_numpyro_nuts(data, seed=args.seed + i, **nuts_cfg)
        rec["numpyro_nuts_s"] = time.perf_counter() - t0
        rec["numpyro_nuts_compile_s"] = ref.compile_seconds
        rec["numpyro_nuts_run_s"] = max(0.0, rec["numpyro_nuts_s"] - ref.compile_seconds)
        rec["numpyro_nuts_run_full_est_s"] = rec["numpyro_nuts_run_s"] * full_iters / iters
        rec["reference"] = {
            "ok": ref.ok,
            "parameterization": ref.parameterization,
            "r_hat_max": max(ref.r_hat.values()),
            "ess_bulk_min": min(ref.ess_bulk.values()),
            "divergences": ref.divergences,
        }
        log.info("groups %d dataset %d: %s", groups, i, ref.summary())
        for row in compare(q, ref.samples, LEVELS):
            rows["amortized"].append({**row, "dataset": i})

        if run_pyro_nuts:
            t0 = time.perf_counter()
            res = run_nuts(MODEL, data, seed=args.seed + i, **nuts_cfg)
            rec["pyro_nuts_s"] = time.perf_counter() - t0
            rec["pyro_nuts_ok"] = res.ok
            for row in compare(res.samples, ref.samples, LEVELS):
                rows["pyro_nuts"].append({**row, "dataset": i})

        t0 = time.perf_counter()
        svi_draws = fit_svi(data, args.svi_steps, args.svi_lr, args.draws, seed=args.seed + i)
        rec["pyro_svi_s"] = time.perf_counter() - t0
        for row in compare(svi_draws, ref.samples, LEVELS):
            rows["pyro_svi"].append({**row, "dataset": i})
        per.append(rec)
        print(
            f"  groups {groups} dataset {i}: amortized {rec['amortized_s']:.3f} s, NumPyro NUTS "
            f"{rec['numpyro_nuts_s']:.1f} s (compile {ref.compile_seconds:.1f} s, ref ok {ref.ok}), "
            f"Pyro NUTS {rec.get('pyro_nuts_s', float('nan')):.1f} s, SVI {rec['pyro_svi_s']:.1f} s",
            flush=True,
        )

    def mean(key: str) -> float | None:
        vals = [r[key] for r in per if key in r]
        return sum(vals) / len(vals) if vals else None

    amortized_s = mean("amortized_s")
    seconds = {
        "amortized": amortized_s,
        "amortized_batched": mean("amortized_batched_s"),
        "amortized_compiled": mean("amortized_compiled_s"),
        "amortized_batched_compiled": mean("amortized_batched_compiled_s"),
        "numpyro_nuts": mean("numpyro_nuts_s"),
        "numpyro_nuts_run": mean("numpyro_nuts_run_s"),
        "numpyro_nuts_compile": mean("numpyro_nuts_compile_s"),
        "numpyro_nuts_run_full_est": mean("numpyro_nuts_run_full_est_s") if large else None,
        "pyro_nuts": mean("pyro_nuts_s"),
        "pyro_svi": mean("pyro_svi_s"),
    }
    others = {k: v for k, v in seconds.items() if not k.startswith("amortized") and k != "numpyro_nuts_compile"}
    speedup = {k: (v / amortized_s if v is not None else None) for k, v in others.items()}
    batched = seconds["amortized_batched"]
    speedup_batched = {k: (v / batched if v is not None and batched else None) for k, v in others.items()}
    fastest = min((v for k, v in seconds.items() if k.startswith("amortized") and v), default=None)
    speedup_fastest = {k: (v / fastest if v is not None and fastest else None) for k, v in others.items()}
    even = {k: break_even(training["train_seconds"], v, amortized_s) for k, v in others.items()}
    return {
        "groups": groups,
        "datasets": len(datasets),
        "rows_per_dataset": [d.n_obs for d in datasets],
        "structure": "one fixed structure" if fixed else "one structure per dataset",
        "amortizer": training,
        "nuts_settings": {**nuts_cfg, "reduced": large, "chain_method": "sequential"},
        "pyro_nuts": run_pyro_nuts,
        "seconds_per_dataset": seconds,
        "speedup_vs": speedup,
        "batch": args.batch if batched else None,
        "speedup_batched_vs": speedup_batched,
        "fastest_amortized": min(
            (k for k, v in seconds.items() if k.startswith("amortized") and v), key=lambda k: seconds[k], default=None
        ),
        "speedup_fastest_vs": speedup_fastest,
        "break_even_datasets": even,
        "accuracy": {m: accuracy(r) for m, r in rows.items() if r},
        "per_dataset": per,
    }


def acceptance(entry: dict[str, Any]) -> list[str]:
    """Issue #7's acceptance lines for the 50- and 10^4-group sizes (other sizes: none)."""
    g, sp, acc = entry["groups"], entry["speedup_vs"], entry["accuracy"]["amortized"]
    lines = []
    if g == 50:
        core = all(acc[k] is not None and acc[k] <= v for k, v in CORE.items())
        sd = acc["global_sd_ratio_median"]
        core = core and sd is not None and CORE_SD_RATIO[0] <= sd <= CORE_SD_RATIO[1]
        fast = sp["numpyro_nuts_run"] >= 1000
        spb = entry.get("speedup_batched_vs") or {}
        batched = ""
        if spb.get("numpyro_nuts_run"):
            verdict = "pass" if spb["numpyro_nuts_run"] >= 1000 else "MISS"
            batched = (
                f"; {entry['batch']} datasets per call: {spb['numpyro_nuts_run']:.0f}x sampling alone "
                f"({spb['numpyro_nuts']:.0f}x with compilation), target: {verdict}"
            )
        spf = entry.get("speedup_fastest_vs") or {}
        if entry.get("fastest_amortized") not in (None, "amortized", "amortized_batched") and spf.get(
            "numpyro_nuts_run"
        ):
            verdict = "pass" if spf["numpyro_nuts_run"] >= 1000 else "MISS"
            fast_name, fast_x = entry["fastest_amortized"], spf["numpyro_nuts_run"]
            batched += f"; fastest ({fast_name}): {fast_x:.0f}x sampling alone, target: {verdict}"
        lines.append(
            f"50 groups: amortized {sp['numpyro_nuts_run']:.0f}x faster than NumPyro NUTS sampling alone "
            f"({sp['numpyro_nuts']:.0f}x with compilation), target >= 1000x: {'pass' if fast else 'MISS'}{batched}; "
            f"core accuracy (globals z median <= 0.15, p90 <= 0.6, sd ratio median in [0.85, 1.3]; groups z median "
            f"<= 0.08, p90 <= 0.25): {'pass' if core else 'MISS'}"
        )
    if g == 10_000:
        fast = sp["numpyro_nuts_run"] >= 10_000
        z = acc["group_z_median"]
        est = sp.get("numpyro_nuts_run_full_est")
        est_txt = f"; {est:.0f}x against the full-settings estimate" if est is not None else ""
        lines.append(
            f"10^4 groups: amortized {sp['numpyro_nuts_run']:.0f}x faster than NumPyro NUTS sampling alone "
            f"({sp['numpyro_nuts']:.0f}x with compilation{est_txt}), target >= 10^4x: {'pass' if fast else 'MISS'}; "
            f"group z median {z:.3f} (target <= 0.1): {'pass' if z is not None and z <= 0.1 else 'MISS'}"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown: one speed-and-accuracy table, one training/break-even table, notes."""
    rows = []
    for e in results["sizes"]:
        s, sp, acc = e["seconds_per_dataset"], e["speedup_vs"], e["accuracy"]
        names = {
            "amortized": "amortized (1000 draws)",
            "amortized_batched": f"amortized, {e.get('batch')} datasets of one structure per call (per dataset)",
            "amortized_compiled": "amortized, compiled drawing kernel (1000 draws)",
            "amortized_batched_compiled": f"amortized, compiled, {e.get('batch')} datasets per call (per dataset)",
            "numpyro_nuts": "NumPyro NUTS, compile+run (the reference)",
            "numpyro_nuts_run": "NumPyro NUTS, run only",
            "numpyro_nuts_run_full_est": "NumPyro NUTS, run only, est. at full draws",
            "pyro_nuts": "Pyro NUTS (JIT)",
            "pyro_svi": "Pyro SVI AutoNormal + 1000 draws",
        }
        for key, name in names.items():
            if s.get(key) is None:
                continue
            a = acc.get(key)
            row = {"groups": e["groups"], "method": name, "s_per_dataset": s[key]}
            row["amortized_speedup"] = sp.get(key) if not key.startswith("amortized") else None
            if key in ("amortized", "pyro_nuts", "pyro_svi") and a is not None:
                row.update(a)
            rows.append(row)
    cols = [
        "groups",
        "method",
        "s_per_dataset",
        "amortized_speedup",
        "global_z_median",
        "global_z_p90",
        "global_sd_ratio_median",
        "group_z_median",
        "group_z_p90",
        "group_sd_ratio_median",
    ]
    train_rows = []
    for e in results["sizes"]:
        be = e["break_even_datasets"]
        ok = sum(r["reference"]["ok"] for r in e["per_dataset"])
        train_rows.append(
            {
                "groups": e["groups"],
                "train_s": e["amortizer"]["train_seconds"],
                "train_s_measured": e["amortizer"]["measured"],
                "break_even_vs_numpyro": be["numpyro_nuts"],
                "break_even_vs_numpyro_run": be["numpyro_nuts_run"],
                "break_even_vs_pyro_nuts": be["pyro_nuts"],
                "break_even_vs_svi": be["pyro_svi"],
                "ref_ok": f"{ok}/{e['datasets']}",
                "ref_r_hat_max": max(r["reference"]["r_hat_max"] for r in e["per_dataset"]),
                "ref_divergences": sum(r["reference"]["divergences"] for r in e["per_dataset"]),
                "pyro_nuts_ok": f"{sum(r['pyro_nuts_ok'] for r in e['per_dataset'])}/{e['datasets']}"
                if e["pyro_nuts"]
                else None,
            }
        )
    notes = []
    for e in results["sizes"]:
        n = e["nuts_settings"]
        draws = f"{n['num_chains']} chains x ({n['num_warmup']} warm-up + {n['num_samples']} draws)"
        line = f"- {e['groups']} groups ({e['structure']}, rows {e['rows_per_dataset']}): "
        line += f"amortizer {e['amortizer']['how']}. NumPyro NUTS: {draws}, reparam {n['reparam']}."
        if n["reduced"]:
            line += (
                f" NUTS draws REDUCED at this size to keep the run short (the estimate at full draws, 2x"
                f"({results['settings']['nuts_warmup']}+{results['settings']['nuts_draws']}), scales the measured"
                " run time by iterations); Pyro NUTS not run (too slow at this size). Accuracy is over every"
                " dataset, also those whose reference misses its R-hat / ESS >= 100 checks (max and min over"
                " all elements: with this few draws, expected for thousands of elements)."
            )
        flags = sorted({f for r in e["per_dataset"] for f in r.get("range_flags", [])})
        if flags:
            line += f" Outside the amortizer's training range: {'; '.join(flags)}."
        notes.append(line)
    head = (
        f"{results_header(results)} {results['datasets']} datasets per size, "
        f"the same datasets for every method; seconds per dataset are means (amortized: median of "
        f"{results['repeats']} calls per dataset). Accuracy against NumPyro NUTS draws of the same dataset; "
        "speed-up = method seconds / amortized seconds; break-even = training seconds / (method - amortized) "
        "seconds per dataset."
    )
    acc_lines = [f"- {line}" for e in results["sizes"] for line in acceptance(e)]
    return "\n\n".join(
        [
            head,
            to_markdown(rows, cols),
            to_markdown(train_rows),
            "\n".join(notes),
            "Acceptance (issue #7):\n" + ("\n".join(acc_lines) or "- (no 50- or 10^4-group size in this run)"),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, nargs="+", default=[50, 10_000])
    p.add_argument("--obs", type=int, nargs=2, default=[5, 15], metavar=("MIN", "MAX"), help="rows per group")
    p.add_argument("--datasets", type=int, default=3, help="datasets per size")
    p.add_argument("--draws", type=int, default=1000, help="amortized and SVI draws per dataset")
    p.add_argument("--repeats", type=int, default=3, help="amortized calls per dataset (median)")
    p.add_argument("--checkpoint", help="a gaussian_2level amortizer trained on SAMPLERS['gaussian_2level']")
    p.add_argument("--steps", type=int, default=1000, help="training steps when no --checkpoint")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--nuts-warmup", type=int, default=500, help="NUTS warm-up per chain (NumPyro and Pyro)")
    p.add_argument("--nuts-draws", type=int, default=1000, help="NUTS draws per chain (NumPyro and Pyro)")
    p.add_argument("--nuts-reparam", default="auto", choices=["auto", "none", "noncentered"])
    p.add_argument("--batch", type=int, default=64, help="datasets per call of the batched amortized timing (1: none)")
    p.add_argument("--compile", action="store_true", help="also time the compiled drawing kernel (Amortizer.compile)")
    p.add_argument("--large-groups", type=int, default=1000, help="sizes above this: reduced NUTS, no Pyro NUTS")
    p.add_argument(
        "--large-checkpoint",
        help="a gaussian_2level amortizer for the sizes outside the training range (default: train one"
        " here on the fixed structure); its range flags are reported",
    )
    p.add_argument("--large-steps", type=int, default=200, help="training steps of a fixed-structure amortizer")
    p.add_argument("--large-batch-size", type=int, default=4)
    p.add_argument("--large-pilot", type=int, default=4, help="pilot structures of a fixed-structure amortizer")
    p.add_argument("--large-nuts-warmup", type=int, default=100)
    p.add_argument("--large-nuts-draws", type=int, default=100)
    p.add_argument("--large-nuts-reparam", default="none", choices=["auto", "none", "noncentered"])
    p.add_argument("--skip-pyro-nuts", action="store_true")
    p.add_argument("--svi-steps", type=int, default=2000)
    p.add_argument("--svi-lr", type=float, default=0.05, help="initial Adam rate (decays to a tenth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints/bench-speed")
    args = p.parse_args(argv)
    try:
        import numpyro  # noqa: F401
    except ImportError:
        print("speed.py needs the bench extra: pip install 'amortize[bench]' (numpyro, jax)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    quiet = logging.getLogger("amortize")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # out-of-range flags and NUTS retries are reported in the table instead
    try:
        return run(args)
    finally:
        quiet.setLevel(level)


def run(args: argparse.Namespace) -> int:
    """The benchmark for parsed ``args`` (see :func:`main`)."""
    import jax

    os.makedirs(args.out, exist_ok=True)
    extra = (
        f" ({torch.get_num_threads()} thread(s)), jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    results: dict[str, Any] = {
        **machine_info(extra=extra, with_time=True),
        "datasets": args.datasets,
        "repeats": args.repeats,
        "settings": vars(args),
        "sizes": [],
    }
    t_start = time.perf_counter()
    shared = None
    if any(in_range(g, tuple(args.obs)) for g in args.groups):
        shared = shared_amortizer(args)
        print(f"amortizer: {shared[1]['how']} ({shared[1]['train_seconds']:.0f} s)", flush=True)
    for index, groups in enumerate(args.groups):
        results["sizes"].append(run_size(groups, index, args, shared))
        results["total_seconds"] = time.perf_counter() - t_start
        md = markdown(results)
        write_results(args.out, results, md)
    print("\n" + md, flush=True)
    print(f"\nwritten: {args.out}/results.json, {args.out}/results.md ({results['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
