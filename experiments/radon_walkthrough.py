"""A worked example on real data: radon in 919 Minnesota houses in 85 counties, with the Python API.

Read it top to bottom like a notebook; each section prints what it did. It loads the CSV, shows the
model, trains an amortized posterior (the settings of ``experiments/radon_minnesota.yaml``), draws
the posterior of all 91 parameters in one forward pass, summarizes it per county name (amortize's
table and ArviZ's), checks it (Pareto k, training-range flags) and compares it with the Inference
Gym's long-MCMC ground truth.

    python experiments/radon_walkthrough.py                 # the config's 3000 steps (tens of minutes on 2 CPUs)
    python experiments/radon_walkthrough.py --steps 30      # a quick look (the numbers will be poor)
    python experiments/radon_walkthrough.py --load checkpoints/radon_minnesota/<timestamp>   # reuse a run
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

import amortize as am
from amortize.config import load_config
from amortize.models import radon
from amortize.validate import compare, format_table, reference, summarize

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "radon_minnesota.yaml"
COUNTIES = ["HENNEPIN", "LAC QUI PARLE", "AITKIN", "ST LOUIS"]  # the largest, a high-radon one, two others


def section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(CONFIG)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=cfg.train.steps, help=f"training steps (default {cfg.train.steps})")
    p.add_argument("--batch-size", type=int, default=cfg.train.batch_size)
    p.add_argument("--out", default="checkpoints/radon_walkthrough", help="checkpoint and TensorBoard folder")
    p.add_argument("--load", metavar="CHECKPOINT", help="skip training: a checkpoint or 'amortize train' run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    progress = not args.quiet and not os.environ.get("CI")

    # ------------------------------------------------------------------------------------------------
    section("1. The data: one row per house, one id column per level")
    # The long format users' data arrives in: county (name), log_radon (response), floor (a house
    # covariate) and the county covariates log_uranium and floor_mean, repeated on each house's row.
    spec = cfg.data["radon_minnesota"]
    data = am.HierarchicalData.from_csv(spec.path, ["county"], response="log_radon", covariates=radon.COVARIATES)
    print(data)
    per_county = data.counts("county")
    print(
        f"{data.n_obs} houses in {data.size('county')} counties; houses per county {int(per_county.min())}-"
        f"{int(per_county.max())} (median {int(per_county.median())})"
    )
    print(f"first counties: {data.labels['county'][:5]}")

    # ------------------------------------------------------------------------------------------------
    section("2. The model: plain Pyro, one plate per level")
    print(inspect.getsource(radon._contextual_effects))
    model = radon.radon_contextual_effects  # HalfNormal(1) priors on both scales
    structure = am.trace_structure(model, data)  # what amortize reads from one traced run
    for s in structure.latents:
        print(f"  {s.name:<20} level {s.level or 'global':<8} event shape {tuple(s.event_shape)}  support {s.support}")
    print(f"  response: {structure.response}")

    # ------------------------------------------------------------------------------------------------
    section("3. Training on datasets simulated on the real structure")
    if args.load:  # a checkpoint file, or a run folder of 'amortize train experiments/radon_minnesota.yaml'
        amortizer = am.Amortizer.load(args.load, model)
        print(f"loaded {args.load}: {amortizer}")
    else:
        # Passing the dataset as the sampler trains on its exact structure and covariates (its response
        # is not used): every step simulates new county effects and new radon readings from the prior.
        amortizer = am.Amortizer(
            model,
            data,
            hidden=cfg.network.hidden,
            seed=cfg.seed,
            device=cfg.device,
            global_coupling=cfg.network.global_coupling,
        )
        print(f"{amortizer}: {args.steps} steps x {args.batch_size} simulated datasets")
        t0 = time.perf_counter()
        amortizer.fit(
            config=cfg.train,
            steps=args.steps,
            batch_size=args.batch_size,
            log_dir=f"{args.out}/tb",  # tensorboard --logdir checkpoints/radon_walkthrough
            progress=progress,
        )
        amortizer.save(f"{args.out}/checkpoint.pt")  # am.Amortizer.load(path, model) gives it back
        loss = amortizer.history[-1]["loss"] if amortizer.history else float("nan")
        print(f"trained {amortizer.step} steps in {time.perf_counter() - t0:.0f} s; final loss {loss:.3f}")
        print(f"checkpoint: {args.out}/checkpoint.pt; TensorBoard: {args.out}/tb")

    # ------------------------------------------------------------------------------------------------
    section("4. The posterior of the real data: one forward pass")
    post = amortizer.posterior(data)
    t0 = time.perf_counter()
    draws = post.sample(4000, seed=0)
    print(f"4000 joint draws of every parameter in {1000 * (time.perf_counter() - t0):.0f} ms:")
    for name, v in draws.items():
        print(f"  {name:<20} {tuple(v.shape)}")

    # ------------------------------------------------------------------------------------------------
    section("5. Summaries by county name")
    wanted = [c for c in COUNTIES if c in data.labels["county"]]
    lines = post.summary(4000, seed=0).splitlines()
    keep = [ln for ln in lines[1:] if "[" not in ln or any(f"[{c}]" in ln for c in wanted) or "weight[" in ln]
    print("post.summary() (globals and a few counties):")
    print("\n".join([lines[0], *keep]))
    try:
        import arviz as az
    except ImportError:
        print("(ArviZ is not installed: pip install 'amortize[arviz]' for post.to_arviz())")
    else:
        idata = post.to_arviz(4000, seed=0)  # dims named after the levels; coords are the county names
        print("\naz.summary(idata, var_names=['county_effect'], coords={'county': [...]}):")
        print(az.summary(idata, var_names=["county_effect"], coords={"county": wanted}, kind="stats"))

    # ------------------------------------------------------------------------------------------------
    section("6. Can these draws be trusted for this dataset?")
    # Pareto k of the importance weights p(y, z) / q(z | y): below 0.7 q covers the posterior well
    # enough to trust (and to refine with post.sample(n, correct=True)); above it, do not use the draws.
    diag = post.diagnostics(num_samples=1000, seed=0)
    verdict = "trust it" if diag["ok"] else "do NOT trust it: train longer, or check with NUTS (amortize validate)"
    print(f"Pareto k {diag['pareto_k']:.2f}, importance ESS {diag['ess']:.0f}/{diag['num_samples']}")
    print(f"outside the training range: {diag['flags'] or 'nothing'} -> {verdict}")

    # ------------------------------------------------------------------------------------------------
    section("7. Against the Inference Gym's ground truth (CmdStan, 10 chains x 20000 draws)")
    try:
        gym, truth = reference.radon_minnesota("halfnormal")
    except reference.ReferenceNotFoundError as e:
        print(f"skipped: {e}")
        return 0
    assert gym.county_names == data.labels["county"], "county order differs from the reference's"
    levels = {s.name: s.level for s in structure.latents}
    rows = compare(draws, truth, levels)  # z = |mean - true mean| / true sd; sd ratio = sd / true sd
    print(
        format_table(
            summarize(rows, by="site"),
            ["site", "count", "z_median", "z_p90", "sd_ratio_median", "sd_ratio_p10", "sd_ratio_p90", "coverage90"],
        )
    )
    names, effect = data.labels["county"], draws["county_effect"]  # effect: [4000, 85]
    picked = []
    for r in rows:
        j = r["group"] if r["site"] == "county_effect" else None  # no labels given: the county's position
        if j is not None and names[j] in wanted:
            true_mean, true_sd = float(truth.mean["county_effect"][j]), float(truth.sd["county_effect"][j])
            mean, sd = float(effect[:, j].mean()), float(effect[:, j].std())
            picked.append({"county": names[j], "true_mean": true_mean, "true_sd": true_sd, "mean": mean, "sd": sd})
    print()
    print(format_table(picked))
    within = sum(r["z"] <= 0.3 and 0.8 <= r["sd_ratio"] <= 1.25 for r in rows)
    print(f"\n{within}/{len(rows)} parameters within z <= 0.3 and sd ratio in [0.8, 1.25]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
