"""Batched inference throughput of the 2-level Gaussian model, and inference cost versus groups.

Two tables, both timing ``amortizer.posterior(...).sample(draws)`` end to end (validation, grouping
and stacking of the list, encoder, draws, per-dataset split), after a warm-up call, best of
``--repeats``:

1. throughput: B datasets of ONE structure (``--groups-per-dataset`` groups, ragged 5-30
   observations each, responses simulated from the prior predictive), passed as a list of B
   single datasets (one vectorized batch), for B in ``--batch-sizes``: datasets/s and the latency
   per joint draw (seconds / (B x draws)); next to it, the same draws asked for one dataset per
   call (``--loop-datasets`` of them);
2. scale: ONE dataset with G groups (``--obs-per-group`` rows each) for G in ``--groups``: seconds,
   and seconds per group, which is flat when inference is linear in the number of groups.

The amortizer is briefly trained (``--steps``, default 50: timing does not depend on the weights),
or loaded from ``--checkpoint``. Draws per dataset are ``--draws`` (1000), reduced for the biggest
batches so that the returned draws stay under ``--max-draw-elements`` numbers (the table says what
was used). Prints markdown; writes ``results.json`` and ``results.md`` atomically to ``--out``.

    python experiments/bench/throughput.py [--device cpu] [--batch-sizes 1 4 16 ...] [--groups 10 100 ...]
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import amortize as am
from amortize.models import SAMPLERS, gaussian_2level
from amortize.validate.results import machine_info, results_header, write_results

log = logging.getLogger("throughput")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int, budget_s: float) -> tuple[float, float]:
    """Wall and CPU seconds of the fastest of up to ``repeats`` calls (fewer once ``budget_s`` is
    spent). On a shared machine CPU seconds below wall seconds mean the process waited for a core."""
    times: list[tuple[float, float]] = []
    start = time.perf_counter()
    while len(times) < repeats:
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
        if time.perf_counter() - start > budget_s:
            break
    return min(times)


def structure(groups: int, obs: tuple[int, int], seed: int) -> am.HierarchicalData:
    sampler = am.StructureSampler(["group"], groups={"group": (groups, groups)}, obs=obs)
    return sampler.sample(torch.Generator().manual_seed(seed))


def simulated(amortizer: am.Amortizer, data: am.HierarchicalData, n: int, seed: int) -> torch.Tensor:
    """``[n, N]`` responses from the prior predictive on ``data``'s structure (on the CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sims = []
        while sum(len(s) for s in sims) < n:
            sims.append(am.simulate(amortizer.model, amortizer.structure, data, n).data.y)
    return torch.cat(sims)[:n]


def peak_memory(device: torch.device) -> float:
    """Peak memory so far in MiB: CUDA allocations on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Markdown: ``columns`` are (key, header, format)."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---:|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: one core)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    p.add_argument("--groups-per-dataset", type=int, default=50)
    p.add_argument("--groups", type=int, nargs="+", default=[10, 100, 1000, 10_000])
    p.add_argument("--obs-per-group", type=int, default=10, help="rows per group in the scale table")
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--max-draw-elements", type=float, default=2.5e8, help="cap on B x draws x (latents per dataset)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-datasets", type=int, default=16, help="datasets timed one call each, for comparison")
    p.add_argument("--budget", type=float, default=10.0, help="seconds of repeats per row, at most")
    p.add_argument("--steps", type=int, default=50, help="training steps (batch 32) before timing")
    p.add_argument("--checkpoint", help="time a trained checkpoint of gaussian_2level instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints/bench-throughput")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    quiet = logging.getLogger("amortize")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # out-of-range warnings are expected for 10^4 groups
    try:
        return run(args)
    finally:
        quiet.setLevel(level)


def run(args: argparse.Namespace) -> int:
    """Both tables for parsed ``args`` (see :func:`main`)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.checkpoint:
        amortizer = am.Amortizer.load(args.checkpoint, gaussian_2level, device=device)
        trained = f"checkpoint {args.checkpoint} (step {amortizer.step})"
    else:
        amortizer = am.Amortizer(gaussian_2level, SAMPLERS["gaussian_2level"](), seed=args.seed, device=device)
        amortizer.fit(steps=args.steps, batch_size=32, pilot_structures=4, progress=False)
        trained = f"briefly trained ({args.steps} NPE steps x 32 datasets; timing does not depend on the weights)"
    setup_s = time.perf_counter() - t0
    dtype = next(amortizer.guide.parameters()).dtype
    results: dict[str, Any] = {
        **machine_info(device, threads=True, with_time=True),
        "model": "gaussian_2level",
        "amortizer": trained,
        "hidden": amortizer.hidden,
        "dtype": str(dtype),
        "setup_seconds": setup_s,
        "settings": vars(args),
    }
    print(f"{results['machine']}; gaussian_2level, {trained}\n", flush=True)

    # ------------------------------------------------------------------ 1. throughput vs batch size
    base = structure(args.groups_per_dataset, (5, 30), args.seed)
    latents = base.size("group") + 3  # theta per group, mu, tau, sigma
    ys = simulated(amortizer, base, max(args.batch_sizes), args.seed + 1)
    rows: list[dict[str, Any]] = []
    for B in args.batch_sizes:
        draws = int(min(args.draws, max(1, args.max_draw_elements // (B * latents))))
        datasets = [base.with_response(ys[i]) for i in range(B)]
        amortizer.posterior(datasets[: min(B, 4)]).sample(10, seed=0)  # warm-up
        seconds, cpu = best_time(
            lambda datasets=datasets, draws=draws: amortizer.posterior(datasets).sample(draws, seed=0),
            device,
            args.repeats,
            args.budget,
        )
        k = min(B, args.loop_datasets)  # the same datasets one call each, for comparison
        looped, _ = best_time(
            lambda datasets=datasets, draws=draws, k=k: [
                amortizer.posterior(d).sample(draws, seed=0) for d in datasets[:k]
            ],
            device,
            1,
            args.budget,
        )
        row = {
            "batch": B,
            "looped_datasets_per_s": k / looped,
            "draws": draws,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "datasets_per_s": B / seconds,
            "draws_per_s": B * draws / seconds,
            "us_per_draw": 1e6 * seconds / (B * draws),
            "datasets_per_s_at_1000": B / seconds * draws / 1000,
            "peak_mib": peak_memory(device),
        }
        rows.append(row)
        print(
            f"batch {B:>5}: {draws} draws each, {seconds:.3f} s, {row['datasets_per_s']:.1f} datasets/s,"
            f" {row['us_per_draw']:.2f} us per draw ({row['looped_datasets_per_s']:.1f} datasets/s one call each)",
            flush=True,
        )
    results["throughput"] = {"groups": base.size("group"), "rows_per_dataset": base.n_obs, "rows": rows}

    # ------------------------------------------------------------------ 2. cost vs number of groups
    scale: list[dict[str, Any]] = []
    for G in args.groups:
        data = structure(G, (args.obs_per_group, args.obs_per_group), args.seed + 2)
        data = data.with_response(simulated(amortizer, data, 1, args.seed + 3)[0])
        amortizer.posterior(data).sample(10, seed=0)  # warm-up
        seconds, cpu = best_time(
            lambda data=data: amortizer.posterior(data).sample(args.draws, seed=0), device, args.repeats, args.budget
        )
        scale.append(
            {
                "groups": G,
                "rows": data.n_obs,
                "draws": args.draws,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "us_per_group": 1e6 * seconds / G,
                "ns_per_group_draw": 1e9 * seconds / (G * args.draws),
                "peak_mib": peak_memory(device),
            }
        )
        print(f"groups {G:>6}: {data.n_obs} rows, {seconds:.3f} s ({scale[-1]['us_per_group']:.1f} us per group)")
    if len(scale) >= 2:
        a, b = scale[-2], scale[-1]
        exponent = math.log(b["seconds"] / a["seconds"]) / math.log(b["groups"] / a["groups"])
    else:
        exponent = float("nan")
    results["scale"] = {"obs_per_group": args.obs_per_group, "rows": scale, "exponent_last_two": exponent}

    # ------------------------------------------------------------------ report
    md = [
        results_header(results),
        f"Model gaussian_2level, amortizer {trained}, hidden {amortizer.hidden}, {dtype}.",
        "",
        f"### Batched inference: B datasets of one structure ({base.size('group')} groups, {base.n_obs} rows),"
        " passed as a list",
        "",
        table(
            rows,
            [
                ("batch", "datasets", "d"),
                ("draws", "draws each", "d"),
                ("seconds", "seconds", ".3f"),
                ("cpu_seconds", "CPU s", ".3f"),
                ("datasets_per_s", "datasets/s", ".1f"),
                ("datasets_per_s_at_1000", "datasets/s (per 1000 draws)", ".1f"),
                ("us_per_draw", "us per joint draw", ".2f"),
                ("looped_datasets_per_s", "datasets/s, one call each", ".1f"),
                ("peak_mib", "peak MiB", ".0f"),
            ],
        ),
        "",
        f"### Cost versus groups: one dataset, {args.obs_per_group} rows per group, {args.draws} draws",
        "",
        table(
            scale,
            [
                ("groups", "groups", "d"),
                ("rows", "rows", "d"),
                ("seconds", "seconds", ".3f"),
                ("cpu_seconds", "CPU s", ".3f"),
                ("us_per_group", "us per group", ".1f"),
                ("ns_per_group_draw", "ns per group and draw", ".1f"),
                ("peak_mib", "peak MiB", ".0f"),
            ],
        ),
        "",
        f"Growth exponent of time in groups between the two largest sizes: {exponent:.2f} (1 = linear).",
        "Seconds are wall time of the fastest repeat, CPU s its process CPU time (below wall: the process"
        " waited for a core on a shared machine). Peak MiB is the process's peak so far (RSS on CPU,"
        " allocated CUDA memory on a GPU).",
    ]
    text = "\n".join(md) + "\n"
    print("\n" + text)
    write_results(args.out, results, text)
    print(f"written: {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
