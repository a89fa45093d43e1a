"""A/B of the likelihood data terms (branch experiment): the same training with and without them
(AMORTIZE_TERMS=0/1 in a subprocess each), then on held-out prior simulations per site: the RMSE of
the posterior mean against the truth (a better posterior has a lower one) and the share of truths in
the central 90% interval.

    python experiments/bench/terms_ab.py MODEL STEPS [BATCH]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch


def negbin_exposure(data):
    """Not shipped: 2-level negative binomial counts with an exposure offset (the README's unshipped model)."""
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(1.0, 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(0.5))
    phi = pyro.sample("phi", dist.LogNormal(1.0, 0.5))
    with pyro.plate("clinic", data.size("clinic")):
        a = pyro.sample("a", dist.Normal(mu, tau))
    rate = data.x["exposure"] * torch.exp(a[..., data.index("clinic")])
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.GammaPoisson(phi, phi / rate), obs=data.y)


def studentt_dof(data):
    """Not shipped: 2-level Student-t response with unknown degrees of freedom."""
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    nu = pyro.sample("nu", dist.Gamma(2.0, 0.1))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.StudentT(nu, theta[..., data.index("group")], sigma), obs=data.y)


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
            o = out.setdefault(s.name, {"se": [], "cover": [], "ae": []})
            o["se"] += ((mean - truth) ** 2).flatten().tolist()
            o["ae"] += (mean - truth).abs().flatten().tolist()
            o["cover"] += ((truth >= lo) & (truth <= hi)).float().flatten().tolist()
    return {
        "train_s": train_s,
        "sites": {
            k: {
                "rmse": (sum(v["se"]) / len(v["se"])) ** 0.5,
                "mae": sum(v["ae"]) / len(v["ae"]),
                "cover90": sum(v["cover"]) / len(v["cover"]),
            }
            for k, v in out.items()
        },
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    model, steps = sys.argv[1], int(sys.argv[2])
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    res = {}
    arms = sys.argv[4].split(",") if len(sys.argv) > 4 else ["0", "1"]
    for flag in arms:
        env = {**os.environ, "AMORTIZE_TERMS": flag, "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, __file__, "--one", model, str(steps), str(batch)], env=env, capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-3000:])
            sys.exit(1)
        res[flag] = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"{model}, {steps} x {batch} NPE steps (arm 0: moments only; arm k: + likelihood terms after k - 1 mode iterations)")
    print("train s: " + ", ".join(f"arm {a} {res[a]['train_s']:.0f}" for a in arms))
    print("| site | " + " | ".join(f"RMSE arm {a}" for a in arms) + " | " + " | ".join(f"MAE arm {a}" for a in arms) + " | " + " | ".join(f"cover90 arm {a}" for a in arms) + " |")
    print("|---|" + "---:|" * (3 * len(arms)))
    for k in res[arms[0]]["sites"]:
        r = [res[a]["sites"][k] for a in arms]
        base = r[0]["rmse"]
        cells = [f"{x['rmse']:.4f}" + ("" if i == 0 else f" ({x['rmse'] / base:.2f})") for i, x in enumerate(r)]
        mae = [f"{x['mae']:.4f}" + ("" if i == 0 else f" ({x['mae'] / r[0]['mae']:.2f})") for i, x in enumerate(r)]
        print(f"| {k} | " + " | ".join(cells) + " | " + " | ".join(mae) + " | " + " | ".join(f"{x['cover90']:.3f}" for x in r) + " |")
    os.makedirs("checkpoints", exist_ok=True)
    with open(f"checkpoints/terms_ab_{model}_{steps}.json", "w") as fh:
        json.dump(res, fh, indent=1)
