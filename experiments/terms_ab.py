"""A/B of the likelihood data terms: the same training under two source trees (each arm a subprocess
importing ``amortize`` from its tree, e.g. a ``git archive`` of 0.3.0 against this checkout), then on
held-out prior simulations per site: the absolute error of the posterior mean against the truth (median,
90% quantile, mean; RMSE: a better posterior has lower ones, the median and quantile robust to a few
extreme datasets) and the share of truths in the central 90% interval.

    python experiments/terms_ab.py MODEL STEPS BATCH NAME=SOURCE_TREE [NAME=SOURCE_TREE ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from models.unshipped import negbin_exposure, studentt_dof  # experiments/models (this file's folder is on sys.path)


def _model_and_sampler(name: str):
    import amortize as am
    import amortize.models as models
    from amortize.models import SAMPLERS

    if name == "negbin_exposure":
        cov = {"obs": {"exposure": {"dist": "uniform", "low": 0.5, "high": 3.0}}}
        return negbin_exposure, am.StructureSampler(["clinic"], groups={"clinic": (8, 30)}, obs=(3, 20), covariates=cov)
    if name == "studentt_dof":
        return studentt_dof, am.StructureSampler(["group"], groups={"group": (10, 40)}, obs=(3, 30))
    return getattr(models, name), SAMPLERS[name]()


def run(model_name: str, steps: int, batch: int) -> dict:
    import amortize as am

    torch.set_num_threads(1)
    model, sampler = _model_and_sampler(model_name)
    a = am.Amortizer(model, sampler, hidden=64, seed=0)
    t0 = time.perf_counter()
    a.fit(steps=steps, batch_size=batch, progress=False)
    train_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(12345)
    import pyro

    pyro.set_rng_seed(12345)  # the held-out responses come from the global RNG: the same set for every arm
    out: dict[str, dict[str, list[float]]] = {}
    for _ in range(16):
        sim = a.simulate_batch(gen, 16)
        draws = a.posterior(sim.data, seed=1).sample(400)
        for s in a.structure.latents:
            truth = a.structure.to_user(s, sim.latents[s.name])[0]  # [B, *shape]
            d = draws[s.name]  # [n, B, *shape]
            mean, lo, hi = d.mean(0), d.quantile(0.05, 0), d.quantile(0.95, 0)
            o = out.setdefault(s.name, {"cover": [], "ae": []})
            o["ae"] += (mean - truth).abs().flatten().tolist()
            o["cover"] += ((truth >= lo) & (truth <= hi)).float().flatten().tolist()
    sites = {}
    for k, v in out.items():
        ae = torch.tensor(v["ae"], dtype=torch.float64)
        sites[k] = {
            "rmse": float(ae.square().mean().sqrt()),
            "mae": float(ae.mean()),
            "medae": float(ae.median()),  # robust: a few extreme datasets do not decide it
            "q90ae": float(ae.quantile(0.9)),
            "cover90": sum(v["cover"]) / len(v["cover"]),
        }
    return {"train_s": train_s, "sites": sites}


def _arm(model: str, steps: int, batch: int, source: str) -> dict:
    """One arm in a subprocess importing ``amortize`` from ``source`` (a source tree)."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(source), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--one", model, str(steps), str(batch)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(model: str, steps: int, batch: int, res: dict[str, dict]) -> str:
    """A markdown table of every site's metrics per arm, ratios against the first arm in brackets."""
    arms = list(res)
    metrics = ["medae", "q90ae", "mae", "rmse"]
    lines = [f"{model}, {steps} x {batch} NPE steps; arms: " + ", ".join(arms)]
    lines.append("train s: " + ", ".join(f"{a} {res[a]['train_s']:.0f}" for a in arms))
    head = [f"{m} {a}" for m in metrics for a in arms] + [f"cover90 {a}" for a in arms]
    lines.append("| site | " + " | ".join(head) + " |")
    lines.append("|---|" + "---:|" * len(head))
    for k in res[arms[0]]["sites"]:
        r = [res[a]["sites"][k] for a in arms]
        cells = []
        for m in metrics:
            for i, x in enumerate(r):
                ratio = "" if i == 0 or not r[0][m] else f" ({x[m] / r[0][m]:.2f})"
                cells.append(f"{x[m]:.4g}{ratio}")
        cells += [f"{x['cover90']:.3f}" for x in r]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    # python terms_ab.py MODEL STEPS BATCH NAME=SOURCE_TREE [NAME=SOURCE_TREE ...]: each arm's result is cached
    model, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.makedirs("checkpoints", exist_ok=True)
    res = {}
    for spec in sys.argv[4:]:
        name, source = spec.split("=", 1)
        path = f"checkpoints/terms_ab_{model}_{steps}_{name}.json"
        if not os.path.exists(path):
            result = _arm(model, steps, batch, source)
            with open(path, "w") as fh:
                json.dump(result, fh, indent=1)
        with open(path) as fh:
            res[name] = json.load(fh)
    print(table(model, steps, batch, res))
