"""Two-process DDP training (``torchrun``, gloo on CPU) against one process on the same datasets.

Runs ``torchrun --nproc_per_node N`` on this script for the multi-process run, then trains the same
amortizer in this process on exactly the same shards (:func:`amortize.distributed.fit_sharded`), and
prints the two loss curves side by side with their relative difference. Writes JSON and markdown
(atomically) to ``--out``.

    python experiments/bench/ddp.py [--nproc 2] [--steps 20] [--batch-size 64] [--objective npe]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import amortize as am
from amortize import models
from amortize.checkpoint import atomic_write
from amortize.distributed import fit_distributed, fit_sharded, init_process_group
from amortize.validate.results import machine_info, results_header, write_results


def make_amortizer(args: argparse.Namespace) -> am.Amortizer:
    return am.Amortizer(getattr(models, args.model), models.SAMPLERS[args.model](), hidden=args.hidden, seed=args.seed)


def options(args: argparse.Namespace) -> dict:
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "objective": args.objective,
        "warmup": min(10, args.steps),
        "log_every": max(1, args.steps // 4),
        "progress": False,
    }


def worker(args: argparse.Namespace) -> int:
    """One process under torchrun: train with DDP; rank 0 writes its loss curve."""
    torch.set_num_threads(args.threads)
    info = init_process_group("gloo")
    try:
        amortizer = make_amortizer(args)
        losses: list[float] = []
        t0 = time.perf_counter()
        fit_distributed(amortizer, callback=lambda step, value: losses.append(value), **options(args))
        seconds = time.perf_counter() - t0
        if info.is_main:
            out = {"losses": losses, "seconds": seconds, "world_size": info.world_size}
            atomic_write(Path(args.out) / "ddp_losses.json", lambda fh: fh.write(json.dumps(out).encode()))
    finally:
        torch.distributed.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes of the DDP run")
    p.add_argument("--model", default="gaussian_2level", choices=sorted(models.SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (datasets per step, all processes)")
    p.add_argument("--objective", default="npe", choices=["npe", "elbo", "iwae"])
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default="checkpoints/bench-ddp")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    os.makedirs(args.out, exist_ok=True)
    stale = Path(args.out) / "ddp_losses.json"
    if stale.exists():
        stale.unlink()
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "nproc")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd += [os.path.abspath(__file__), "--worker", *forwarded]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    wall = time.perf_counter() - t0
    ddp = json.loads(stale.read_text())

    torch.set_num_threads(args.threads)
    amortizer = make_amortizer(args)
    single: list[float] = []
    t0 = time.perf_counter()
    fit_sharded(amortizer, args.nproc, callback=lambda step, value: single.append(value), **options(args))
    single_s = time.perf_counter() - t0

    rows = [
        {"step": i + 1, "ddp": a, "single": b, "rel_diff": abs(a - b) / max(abs(b), 1e-30)}
        for i, (a, b) in enumerate(zip(ddp["losses"], single))
    ]
    worst = max((r["rel_diff"] for r in rows), default=float("nan"))
    head = (
        f"{args.model}, {args.objective}, global batch {args.batch_size}, {args.steps} steps:"
        f" {args.nproc} processes (DDP, gloo) vs 1 process on the same {args.nproc} shards"
    )
    info = machine_info()
    md = [
        results_header(info),
        "",
        head,
        "",
        f"| step | loss, {args.nproc} processes | loss, 1 process | rel. difference |",
        "|---:|---:|---:|---:|",
        *[f"| {r['step']} | {r['ddp']:.7f} | {r['single']:.7f} | {r['rel_diff']:.1e} |" for r in rows],
        "",
        f"max relative difference {worst:.1e}; training {ddp['seconds']:.1f} s with {args.nproc} processes"
        f" ({wall:.1f} s with torchrun start-up), {single_s:.1f} s in one process",
    ]
    text = "\n".join(md) + "\n"
    print(text)
    result = {
        "machine": info["machine"],
        "settings": vars(args),
        "rows": rows,
        "max_rel_diff": worst,
        "ddp_seconds": ddp["seconds"],
    }
    result.update(torchrun_wall_seconds=wall, single_seconds=single_s)
    write_results(args.out, result, text)
    print(f"written: {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
