"""Coverage of the trained poisson_olre amortizer against the true simulated latents, per level (globals,
nations, regions, row effects 'obs'): median |z| of the truth under the posterior, RMS z (1 when calibrated)
and the 90% interval coverage with its 95% Monte Carlo half-width. Prints markdown rows.

    python experiments/poisson_olre_coverage.py CHECKPOINT [--datasets 20]
"""

from __future__ import annotations

import argparse
import math

import torch

import amortize as am
from amortize.config import config_dir, config_source, load_config
from amortize.experiment import build_sampler
from amortize.modelspec import resolve_model
from amortize.simulate import simulate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--config", default="experiments/poisson_olre.yaml")
    p.add_argument("--datasets", type=int, default=20)
    p.add_argument("--draws", type=int, default=500)
    args = p.parse_args()
    cfg = load_config(args.config)
    model = resolve_model(cfg.model, config_dir(cfg), config_source(cfg))
    a = am.Amortizer.load(args.checkpoint, model, sampler=build_sampler(cfg))
    st = a.structure
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(123)
    z: dict[str, list[torch.Tensor]] = {}
    cov: dict[str, list[torch.Tensor]] = {}
    for i in range(args.datasets):
        sim = simulate(model, st, a.sampler.sample(gen), 1)
        d = sim.data.with_response(sim.data.y[0])
        draws = a.posterior(d, seed=i).sample(args.draws)
        for s in st.latents:
            truth = st.to_user(s, sim.latents[s.name])[0, 0]
            x = draws[s.name]
            lvl = s.level or "global"
            z.setdefault(lvl, []).append(((x.mean(0) - truth) / x.std(0)).abs().reshape(-1))
            lo, hi = x.quantile(0.05, 0), x.quantile(0.95, 0)
            cov.setdefault(lvl, []).append(((truth >= lo) & (truth <= hi)).float().reshape(-1))
    print("| level | values | median abs z | RMS z | 90% coverage |\n|---|---:|---:|---:|---:|")
    for lvl in z:
        zz, c = torch.cat(z[lvl]), torch.cat(cov[lvl])
        half = 1.96 * math.sqrt(0.09 / len(c))
        print(f"| {lvl} | {len(zz)} | {zz.median():.3f} | {(zz**2).mean().sqrt():.3f} | {c.mean():.3f} ± {half:.3f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
