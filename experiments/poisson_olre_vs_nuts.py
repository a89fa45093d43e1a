"""Train the observation-level-effect Poisson GLMM of ``poisson_olre.yaml`` with library defaults (NPE) and
compare it with Pyro NUTS on held-out prior-predictive datasets: per level (globals, nations, regions, the
row effects 'obs') z median / p90 and sd ratio. Prints markdown and writes ``--out`` (JSON and markdown).

    python experiments/poisson_olre_vs_nuts.py [--steps 2000] [--datasets 4] [--out experiments/results/olre]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

import amortize as am
from amortize.config import config_dir, config_source, load_config
from amortize.experiment import build_sampler
from amortize.modelspec import resolve_model
from amortize.validate.heldout import against_nuts, heldout_datasets
from amortize.validate.nuts import cached_nuts

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(HERE / "poisson_olre.yaml"))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--datasets", type=int, default=4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--out", default=str(HERE / "results" / "poisson_olre"))
    p.add_argument("--checkpoint", default=None, help="reuse a trained checkpoint instead of training")
    p.add_argument("--nuts-cache", default=None, help="folder of NUTS results to reuse (amortize.validate.nuts)")
    p.add_argument("--nuts-only", action="store_true", help="only run (and cache) NUTS on the held-out datasets")
    p.add_argument("--cached-only", action="store_true", help="compare only on datasets whose NUTS is cached")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = [f"train.steps={args.steps}"] if args.steps else []
    cfg = load_config(args.config, overrides)
    model = resolve_model(cfg.model, config_dir(cfg), config_source(cfg))
    sampler = build_sampler(cfg)
    nuts = {"num_warmup": args.warmup, "num_samples": args.samples, "num_chains": 2}
    if args.nuts_only:  # the held-out datasets do not depend on the weights: NUTS can run beside training
        amortizer = am.Amortizer(model, sampler, hidden=cfg.network.hidden, seed=cfg.seed)
        for i, d in enumerate(heldout_datasets(amortizer, args.datasets)):
            res = cached_nuts(model, d, args.nuts_cache, seed=1 + i, **nuts)
            print(f"dataset {i}: NUTS ok={res.ok} {res.seconds:.0f} s", flush=True)
        return
    if args.checkpoint and Path(args.checkpoint).exists():
        amortizer, seconds = am.Amortizer.load(args.checkpoint, model, sampler=sampler), float("nan")
    else:
        amortizer = am.Amortizer(model, sampler, hidden=cfg.network.hidden, seed=cfg.seed)
        t0 = time.perf_counter()
        amortizer.fit(config=cfg.train)
        seconds = time.perf_counter() - t0
        if args.checkpoint:
            amortizer.save(args.checkpoint)
    losses = [h["loss"] for h in amortizer.history]
    finite = all(math.isfinite(x) for x in losses)
    data = heldout_datasets(amortizer, args.datasets)
    report = against_nuts(
        amortizer,
        data,
        num_samples=1000,
        nuts=nuts,
        seed=1,
        diagnose=True,
        nuts_cache=args.nuts_cache,
        cached_only=args.cached_only,
    )
    ran = [n for n in report.nuts if not n.get("not_run")]
    ok_nuts = sum(1 for n in ran if n.get("ok"))
    skipped = amortizer.history[-1].get("skipped", 0) if amortizer.history else 0
    head = (
        f"# poisson_olre against Pyro NUTS\n\n"
        f"Model `experiments/models/poisson_olre.py` (row effect `e` in plate `obs`: implicit level `obs`),"
        f" structure of `poisson_olre.yaml` (9 nations, 6-11 regions each, 2-7 rows per region:"
        f" {', '.join(f'{d.size(lvl)}' for d in data[:1] for lvl in ('nation', 'region'))} groups and"
        f" {data[0].n_obs} rows in the first held-out dataset).\n\n"
        f"Training: NPE, library defaults, {amortizer.step} steps x batch {cfg.train.batch_size} in {seconds:.0f} s"
        f" (2-core CPU shared with other jobs); losses finite: {finite}; final loss {losses[-1]:.3f};"
        f" skipped steps: {skipped}.\n\n"
        f"Held-out: {len(data)} prior-predictive datasets, NUTS {args.warmup} warmup + {args.samples} draws x 2"
        f" chains; {len(ran)} NUTS runs finished, {ok_nuts} passed their checks (only those are compared).\n\n"
    )
    k = [round(d["pareto_k"], 2) for d in report.diagnostics]
    md = head + report.table() + f"\n\nPareto k per dataset: {k}\n"
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    res = {"steps": amortizer.step, "train_seconds": seconds, "losses_finite": finite, **report.to_dict()}
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
