"""One large dataset (default 10^6 groups, about 10^7 rows): training by group subsampling, the
posterior of every group in chunks, checked against the exact conjugate posterior.

The model has known variances, so the posterior is Gaussian and known in closed form:

    mu ~ N(0, 2),  theta_g ~ N(mu, 1),  y_gi ~ N(theta_g, 0.5)

One dataset is simulated from it (``--groups`` groups, ``--obs-min``..``--obs-max`` rows each,
uniformly: 10 on average), an amortizer is built for the model (never trained on simulations; its
input scalers are fitted on prior simulations on subsets of the dataset by the pilot), trained by
``amortizer.fit(source=am.Subsampled(data, groups_per_step))`` (``--steps`` steps), and
``amortizer.posterior(data, chunk_groups=...).moments(num_draws)``, streamed in chunks, gives every
group's posterior mean and sd. Reported: z = |mean - exact mean| / exact sd (median, 90th
percentile), sd / exact sd (median, 10th and 90th percentiles) for the groups and for mu, wall
seconds per phase, and memory per phase:
the peak resident set of the phase (Linux VmHWM, reset at the start of each phase where the kernel
allows it), the resident set after it, and the bytes held by the dataset and its group index.

Prints a markdown table; writes ``results.json`` and ``results.md`` atomically to ``--out``.

    python experiments/bench/large.py [--groups 1000000] [--steps 2000] [--out checkpoints/bench-large]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

import pyro
import pyro.distributions as dist
import torch

import amortize as am
from amortize.validate.results import machine_info, results_header, write_results

PRIOR_SD, GROUP_SD, NOISE_SD = 2.0, 1.0, 0.5


def known_variance(data: am.HierarchicalData) -> None:
    """mu ~ N(0, 2), theta_g ~ N(mu, 1), y ~ N(theta_g, 0.5): a conjugate Gaussian 2-level model."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, GROUP_SD))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], NOISE_SD), obs=data.y)


def simulate_dataset(groups: int, obs: tuple[int, int], seed: int) -> am.HierarchicalData:
    """One dataset from :func:`known_variance`, simulated with vectorized tensor operations."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.randint(obs[0], obs[1] + 1, (groups,), generator=gen)
    group = torch.repeat_interleave(torch.arange(groups), n)
    mu = PRIOR_SD * torch.randn((), generator=gen)
    theta = mu + GROUP_SD * torch.randn(groups, generator=gen)
    y = theta[group] + NOISE_SD * torch.randn(len(group), generator=gen)
    del theta
    return am.HierarchicalData(["group"], {}, group, y=y)


def exact_posterior(data: am.HierarchicalData) -> dict[str, torch.Tensor]:
    """Exact posterior means and sds (float64) of mu and of every theta_g under :func:`known_variance`.

    ybar_g | mu ~ N(mu, 1 + 0.25 / n_g) gives mu | y; theta_g | mu, y has precision P_g = 1 + n_g / 0.25
    and mean a_g mu + b_g (a_g = 1 / P_g), so its marginal is N(a_g E[mu] + b_g, 1 / P_g + a_g^2 Var[mu])."""
    idx = data.index("group")
    n = data.counts("group").double()
    ybar = torch.zeros(len(n), dtype=torch.float64).index_add_(0, idx, data.y.double()) / n
    w = 1.0 / (GROUP_SD**2 + NOISE_SD**2 / n)
    prec_mu = 1.0 / PRIOR_SD**2 + w.sum()
    m_mu, v_mu = (w * ybar).sum() / prec_mu, 1.0 / prec_mu
    P = 1.0 / GROUP_SD**2 + n / NOISE_SD**2
    a = 1.0 / (GROUP_SD**2 * P)
    b = (n / NOISE_SD**2) * ybar / P
    return {
        "mu_mean": m_mu,
        "mu_sd": v_mu.sqrt(),
        "theta_mean": a * m_mu + b,
        "theta_sd": (1.0 / P + a**2 * v_mu).sqrt(),
    }


# ---------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak resident set of this process (Linux; False where not allowed)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory(device: torch.device) -> dict[str, float | None]:
    """MiB: peak resident set since the last reset (VmHWM), resident set now (VmRSS), the process's
    lifetime peak (``ru_maxrss``) and, on CUDA, the peak of allocated device memory."""
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    out: dict[str, float | None] = {
        "peak_rss_mib": None if hwm is None else hwm / 1024,
        "rss_mib": None if rss is None else rss / 1024,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def tensor_mib(*tensors: torch.Tensor | None) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


def summary(est: torch.Tensor, sd: torch.Tensor, exact_mean: torch.Tensor, exact_sd: torch.Tensor) -> dict[str, float]:
    z = ((est.double() - exact_mean) / exact_sd).abs().reshape(-1)
    r = (sd.double() / exact_sd).reshape(-1)
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    zq = torch.quantile(z[:10_000_000], q)
    rq = torch.quantile(r[:10_000_000], q)
    return {
        "z_median": float(zq[1]),
        "z_p90": float(zq[2]),
        "sd_ratio_median": float(rq[1]),
        "sd_ratio_p10": float(rq[0]),
        "sd_ratio_p90": float(rq[2]),
    }


# ---------------------------------------------------------------------------------- run
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=10**6)
    p.add_argument("--obs-min", type=int, default=5)
    p.add_argument("--obs-max", type=int, default=15)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--groups-per-step", type=int, default=1024)
    p.add_argument("--num-particles", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--lr-scale", type=float, default=10.0, help="q(globals)'s learning rate over --lr (Subsampled)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--num-draws", type=int, default=100, help="global draws per chunk of the group posterior")
    p.add_argument("--chunk-size", type=int, default=None, help="outermost groups per chunk (default: per step)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints/bench-large")
    args = p.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """The benchmark for parsed ``args`` (see :func:`main`)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {**machine_info(device, threads=True, with_time=True), "settings": vars(args)}
    phases: dict[str, dict[str, Any]] = {}
    print(f"{results['machine']}\n", flush=True)

    can_reset = reset_peak()
    t0 = time.perf_counter()
    data = simulate_dataset(args.groups, (args.obs_min, args.obs_max), args.seed)
    phases["data"] = {"seconds": time.perf_counter() - t0, **memory(device)}
    results["groups"], results["obs"] = data.size("group"), data.n_obs
    results["data_mib"] = tensor_mib(data.y, data.group)
    print(f"data: {data.size('group')} groups, {data.n_obs} rows, {phases['data']['seconds']:.1f} s", flush=True)

    sampler = am.StructureSampler(["group"], groups={"group": (10, 50)}, obs=(args.obs_min, args.obs_max))
    amortizer = am.Amortizer(known_variance, sampler, hidden=args.hidden, flow_bins=0, seed=args.seed, device=device)
    reset_peak()
    t0 = time.perf_counter()
    source = am.Subsampled(data, groups_per_step=args.groups_per_step, lr_scale=args.lr_scale)
    amortizer.fit(
        source=source,
        steps=args.steps,
        num_particles=args.num_particles,
        lr=args.lr,
        warmup=50,
        batch_size=32,
        pilot_structures=8,
        progress=False,
    )
    phases["train"] = {"seconds": time.perf_counter() - t0, **memory(device)}
    results["index_mib"] = source.index.nbytes / 2**20
    print(f"train: {args.steps} steps x {args.groups_per_step} groups, {phases['train']['seconds']:.1f} s", flush=True)

    reset_peak()
    t0 = time.perf_counter()
    post = amortizer.posterior(data, chunk_groups=args.chunk_size, seed=args.seed)
    theta = post.moments(num_draws=args.num_draws, level="group")["theta"]  # chunk by chunk
    phases["posterior"] = {"seconds": time.perf_counter() - t0, **memory(device)}
    print(f"posterior of every group: {phases['posterior']['seconds']:.1f} s", flush=True)

    exact = exact_posterior(data)
    mu = post.sample(10_000, seed=args.seed, groups=[0])["mu"]
    results["theta"] = summary(theta.mean, theta.sd, exact["theta_mean"], exact["theta_sd"])
    results["mu"] = {
        **summary(mu.mean().reshape(1), mu.std().reshape(1), exact["mu_mean"], exact["mu_sd"]),
        "mean": float(mu.mean()),
        "sd": float(mu.std()),
        "exact_mean": float(exact["mu_mean"]),
        "exact_sd": float(exact["mu_sd"]),
    }
    results["phases"] = phases
    results["peak_reset_per_phase"] = can_reset
    results["train_loss_last"] = amortizer.history[-1]["loss"] if amortizer.history else None
    results["accepted"] = results["theta"]["z_median"] <= 0.1

    md = report(results)
    print("\n" + md, flush=True)
    json_path, md_path = write_results(args.out, results, md + "\n", indent=2)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def report(r: dict[str, Any]) -> str:
    """The markdown table of one run."""
    s, th, mu, ph = r["settings"], r["theta"], r["mu"], r["phases"]
    peak = "peak RSS of the phase" if r["peak_reset_per_phase"] else "peak RSS so far (process)"

    def mib(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    lines = [
        results_header(r),
        "",
        f"One dataset: {r['groups']} groups, {r['obs']} rows ({s['obs_min']}-{s['obs_max']} per group), model"
        " mu ~ N(0, 2), theta ~ N(mu, 1), y ~ N(theta, 0.5). Training: "
        f"{s['steps']} steps x {s['groups_per_step']} groups x {s['num_particles']} particles (subsampled ELBO);"
        f" posterior of every group from {s['num_draws']} global draws per chunk.",
        "",
        "| phase | seconds | " + peak + " MiB | RSS after MiB |",
        "|---|---:|---:|---:|",
    ]
    for name in ("data", "train", "posterior"):
        p = ph[name]
        lines.append(f"| {name} | {p['seconds']:.1f} | {mib(p['peak_rss_mib'])} | {mib(p['rss_mib'])} |")
    lines += [
        "",
        f"Dataset tensors {r['data_mib']:.0f} MiB, group index {r['index_mib']:.0f} MiB; process peak (ru_maxrss)"
        f" {ph['posterior']['max_rss_mib']:.0f} MiB.",
        "",
        "| latent | z median | z p90 | sd ratio median | sd ratio p10 | sd ratio p90 |",
        "|---|---:|---:|---:|---:|---:|",
        f"| theta (all {r['groups']} groups) | {th['z_median']:.3f} | {th['z_p90']:.3f} | {th['sd_ratio_median']:.3f}"
        f" | {th['sd_ratio_p10']:.3f} | {th['sd_ratio_p90']:.3f} |",
        f"| mu | {mu['z_median']:.3f} | - | {mu['sd_ratio_median']:.3f} | - | - |",
        "",
        f"mu: {mu['mean']:.5f} +- {mu['sd']:.5f} (exact {mu['exact_mean']:.5f} +- {mu['exact_sd']:.5f}).",
        f"Acceptance (theta z median <= 0.1): {'pass' if r['accepted'] else 'FAIL'}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
