"""The README's main job: train an amortized posterior for an example model, then compare it with
NUTS on held-out simulated datasets and print the table (also written as JSON in the run folder).

    python experiments/main.py [--model gaussian_2level] [--steps 5000] [--datasets 10]

(``bash scripts/main.sh --help`` lists the options with the defaults this script uses.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import torch

import amortize as am
from amortize import models
from amortize.checkpoint import atomic_write
from amortize.validate.heldout import against_nuts, heldout_datasets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gaussian_2level", choices=sorted(models.SAMPLERS), help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=5000, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="simulated datasets per step (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="network width (default: %(default)s)")
    p.add_argument("--datasets", type=int, default=10, help="held-out datasets for NUTS (default: %(default)s)")
    p.add_argument("--draws", type=int, default=1000, help="amortized draws per dataset (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    p.add_argument(
        "--root", default="checkpoints", help="runs go to ROOT/main-MODEL/<timestamp> (default: %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.quiet and not os.environ.get("CI")
    run = os.path.join(args.root, f"main-{args.model}", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(run, exist_ok=True)

    model = getattr(models, args.model)
    amortizer = am.Amortizer(model, models.SAMPLERS[args.model](), hidden=args.hidden, seed=args.seed)
    print(f"{amortizer}\nrun folder: {run}", flush=True)
    t0 = time.perf_counter()
    amortizer.fit(
        steps=args.steps,
        batch_size=args.batch_size,
        log_dir=os.path.join(run, "tb"),
        checkpoint_path=os.path.join(run, "checkpoint.pt"),
        progress=progress,
    )
    train_s = time.perf_counter() - t0
    print(f"trained {args.steps} steps in {train_s:.0f} s", flush=True)

    datasets = heldout_datasets(amortizer, args.datasets)
    nuts = {"num_warmup": 500, "num_samples": 1000, "num_chains": 2}  # checks: validate.nuts.checks_passed
    report = against_nuts(amortizer, datasets, num_samples=args.draws, nuts=nuts, progress=progress)
    print(f"\n{args.model}: amortized ({args.draws} draws) vs NUTS on {args.datasets} held-out datasets")
    print(report.table())
    bad = [r for r in report.nuts if not r["ok"]]
    if bad:
        print(f"({len(bad)} dataset(s) left out: NUTS failed its own checks)")
    out = {
        "model": args.model,
        "train_seconds": train_s,
        "steps": args.steps,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        **report.to_dict(),
    }
    atomic_write(os.path.join(run, "validate.json"), lambda fh: fh.write(json.dumps(out, indent=1).encode()))
    print(f"\nresults: {os.path.join(run, 'validate.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
