import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import amortize as am
from amortize.errors import ConfigError
from amortize.objectives import log_weights

from .conftest import normal_known
from .test_cli import MODEL


def heldout_nll(amortizer, sims):
    with torch.no_grad():
        return float(
            torch.stack([-log_weights(amortizer.guide, s.data, 1, truth=s.latents)[1].mean() for s in sims]).mean()
        )


def exact_mu_posterior(data):
    """mu | y for normal_known: ybar_g | mu ~ N(mu, 1 + 0.25 / n_g), prior N(0, 2^2)."""
    n = data.counts("group").double()
    ybar = torch.zeros(data.size("group"), dtype=torch.float64).index_add_(0, data.index("group"), data.y.double()) / n
    prec = 1 / 4 + (1 / (1 + 0.25 / n)).sum()
    mean = (ybar / (1 + 0.25 / n)).sum() / prec
    return float(mean), float(prec**-0.5)


def exact_nll(sims):
    """Mean of -log p(mu, theta | y) at the true values for normal_known (a Gaussian posterior):
    the lowest NPE loss any guide can reach on these datasets."""
    total, count = 0.0, 0
    for sim in sims:
        data = sim.data
        for b in range(data.y.shape[0]):
            d = data.with_response(data.y[b])
            m, sd = exact_mu_posterior(d)
            mu, theta = sim.latents["mu"].reshape(-1)[b].double(), sim.latents["theta"].reshape(-1, d.size("group"))[b]
            n = d.counts("group").double()
            ybar = torch.zeros_like(n).index_add_(0, d.index("group"), d.y.double()) / n
            prec = 1 + 4 * n
            lp = torch.distributions.Normal(m, sd).log_prob(mu)
            cond = torch.distributions.Normal((mu + 4 * n * ybar) / prec, prec.rsqrt())
            lp = lp + cond.log_prob(theta.double()).sum()
            total, count = total - float(lp), count + 1
    return total / count


def test_short_npe_training_improves_and_approaches_exact(small_sampler):
    a = am.Amortizer(normal_known, small_sampler, hidden=32, seed=0)
    gen = torch.Generator().manual_seed(99)
    torch.manual_seed(99)
    sims = [a.simulate_batch(gen, 64) for _ in range(4)]
    a.fit(steps=1, batch_size=64, progress=False)  # pilot fit + one step: the untrained baseline
    before = heldout_nll(a, sims)
    a.fit(steps=400, batch_size=64, lr=3e-3, progress=False)
    after, best = heldout_nll(a, sims), exact_nll(sims)
    assert after - best < 0.5 * (before - best), (before, after, best)  # closes at least half the gap
    # against the exact conjugate posterior of mu on 10 held-out datasets
    zs = []
    for s in range(10):
        sim = a.simulate_batch(gen, 1)
        data = sim.data.with_response(sim.data.y[0])
        m, sd = exact_mu_posterior(data)
        draws = a.posterior(data).sample(2000, seed=s)["mu"]
        zs.append(abs(float(draws.mean()) - m) / sd)
    assert sorted(zs)[5] < 0.5, zs  # median z-error after 400 steps (prototype reached < 0.2 with 3000)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_reverse_kl_objectives_run_and_are_finite(small_sampler, objective):
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    hist = a.fit(steps=30, batch_size=16, objective=objective, num_particles=4, log_every=10, progress=False)
    assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
    # the pilot fit starts near this small model's optimum (step-to-step noise is about 0.2): training
    # must not drift away from it
    assert hist[-1]["loss"] < hist[0]["loss"] + 0.5


def test_refinement_phase_switches_objective_and_rate(small_sampler, monkeypatch):
    from amortize import sources
    from amortize import train as train_mod

    seen = []
    real = sources.batch_loss
    monkeypatch.setattr(sources, "batch_loss", lambda a, cfg, sim: (seen.append(cfg.objective), real(a, cfg, sim))[1])
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    hist = a.fit(steps=6, refine_steps=4, refine_lr=1e-4, batch_size=8, num_particles=2, log_every=2, progress=False)
    assert seen == ["npe"] * 6 + ["elbo"] * 4 and a.step == 10
    cfg = a.config
    assert train_mod.lr_factor(6, cfg) * cfg.lr == pytest.approx(1e-4)  # refinement starts at refine_lr
    assert hist[-1]["lr"] < 1e-4 and hist[-1]["step"] == 10
    with pytest.raises(ConfigError, match="refine_objective"):
        a.fit(refine_objective="kl")
    with pytest.raises(ConfigError, match="refine_steps"):
        a.fit(refine_steps=-1)


def test_fit_rejects_unknown_options(small_sampler):
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    with pytest.raises(ConfigError, match="unknown option"):
        a.fit(step=3)
    with pytest.raises(ConfigError, match="objective"):
        a.fit(objective="kl")


def test_tensorboard_scalars_written(small_sampler, tmp_path):
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    a.fit(steps=10, batch_size=8, log_every=5, progress=False, log_dir=str(tmp_path / "tb"))
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def _global_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_states(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_fit_posterior_and_sample_leave_the_callers_rng_alone(small_sampler, small_data):
    """torch (and so Pyro), numpy and random: fit, posterior, sample, diagnostics read the caller's
    state at most; training follows the amortizer's seed whatever the caller's RNG holds."""
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    before = _global_states()
    a = am.Amortizer(normal_known, small_sampler, hidden=8, flow_bins=0, seed=4)
    a.fit(steps=3, batch_size=8, pilot_structures=2, progress=False)
    post = a.posterior(small_data)
    first, second = post.sample(20), post.sample(20)  # the posterior's own stream: it moves on
    assert not torch.equal(first["mu"], second["mu"])
    post.sample(20, seed=0, correct=True)
    post.diagnostics(num_samples=50)
    a.posterior([small_data, small_data]).sample(5)
    assert _same_states(before, _global_states())
    torch.manual_seed(2)  # another caller state: the same run
    b = am.Amortizer(normal_known, small_sampler, hidden=8, flow_bins=0, seed=4)
    b.fit(steps=3, batch_size=8, pilot_structures=2, progress=False)
    wa, wb = a.guide.state_dict(), b.guide.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _nan_guide_from(monkeypatch, bad):
    """Steps whose index is in ``bad`` run with NaN weights in the global head (restored after the step)."""
    from amortize import sources

    real, calls = sources.batch_loss, []

    def loss(a, cfg, sim):  # one piece per step for these small batches
        calls.append(1)
        if len(calls) - 1 not in bad:
            return real(a, cfg, sim)
        p = next(a.guide.global_head.parameters())
        saved = p.data.clone()
        p.data.fill_(float("nan"))
        try:
            return real(a, cfg, sim)
        finally:
            p.data.copy_(saved)

    monkeypatch.setattr(sources, "batch_loss", loss)


def test_skipped_steps_are_counted_in_the_history_and_reported_per_site(small_sampler, monkeypatch, caplog):
    """Two steps with a NaN inside the guide: the history counts them, one warning at the end names the site."""
    import logging

    _nan_guide_from(monkeypatch, {1, 3})
    a = am.Amortizer(normal_known, small_sampler, hidden=8, flow_bins=0)
    with caplog.at_level(logging.WARNING, logger="amortize.train"):
        hist = a.fit(steps=6, batch_size=8, pilot_structures=2, log_every=1, progress=False)
    assert [h["skipped"] for h in hist] == [0, 1, 2, 2]  # logged after the good steps 0, 2, 4, 5
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training:")]
    assert summary == ["training: 2 of 6 steps left out for a non-finite loss, gradient or guide value (site 'mu': 2)"]


def _one_row_poisson() -> am.Amortizer:
    """Issue #19's 3-level Poisson with one row per innermost group (an observation-level effect), small."""
    from amortize.models import poisson_3level

    sampler = am.StructureSampler(
        ["nation", "region", "county"],
        groups={"nation": (2, 2), "region": (2, 3), "county": (2, 3)},
        obs=(1, 1),
        covariates={"obs": {"exposure": {"dist": "uniform", "low": 0.5, "high": 3.0}}},
    )
    return am.Amortizer(poisson_3level, sampler.sample(torch.Generator().manual_seed(0)), hidden=8, flow_bins=0)


def test_a_nan_in_a_group_data_term_is_skipped_then_stops_naming_the_site(monkeypatch, caplog):
    """The issue's failure, injected: an overflow (inf) in the county data term makes q at 'a_county' fail
    a Real() check inside the guide ('Expected parameter ...'); such steps are skipped and counted, and a run
    where every step fails ends with a TrainingError naming the site and the check that failed."""
    import logging

    from amortize import sources

    real, calls, bad = sources.batch_loss, [], {1, 2}

    def loss(a, cfg, sim):
        calls.append(1)
        if len(calls) - 1 not in bad:
            return real(a, cfg, sim)
        bias = a.guide.group_heads["a_county"].net[-1].bias
        saved = bias.data.clone()
        bias.data.fill_(float("inf"))
        try:
            return real(a, cfg, sim)
        finally:
            bias.data.copy_(saved)

    monkeypatch.setattr(sources, "batch_loss", loss)
    a = _one_row_poisson()
    with caplog.at_level(logging.WARNING, logger="amortize.train"):
        hist = a.fit(steps=5, batch_size=8, pilot_structures=2, log_every=1, progress=False)
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 2 and all("site 'a_county' (Expected parameter" in m for m in skipped), skipped
    assert hist[-1]["skipped"] == 2 and a.step == 5
    assert all(bool(torch.isfinite(v).all()) for v in a.guide.state_dict().values())
    calls.clear()
    bad = set(range(100))
    with pytest.raises(am.TrainingError, match=r"3 consecutive.*site 'a_county' \(Expected parameter"):
        _one_row_poisson().fit(steps=9, batch_size=8, pilot_structures=2, max_bad_steps=3, progress=False)


def test_a_nan_inside_the_guide_is_a_bad_step_naming_the_site(small_sampler, monkeypatch, caplog):
    """A distribution argument check failing on NaN inside the guide skips the step, it does not end training."""
    import logging

    _nan_guide_from(monkeypatch, {1, 2})
    a = am.Amortizer(normal_known, small_sampler, hidden=8, flow_bins=0)
    with caplog.at_level(logging.WARNING, logger="amortize.train"):
        a.fit(steps=5, batch_size=8, pilot_structures=2, objective="elbo", num_particles=2, progress=False)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert a.step == 5 and len(skipped) == 2 and all("site 'mu'" in m for m in skipped), skipped
    assert all(bool(torch.isfinite(v).all()) for v in a.guide.state_dict().values())
    b = am.Amortizer(normal_known, small_sampler, hidden=8, flow_bins=0)
    _nan_guide_from(monkeypatch, set(range(1, 99)))
    with pytest.raises(am.TrainingError, match=r"step 3: 3 consecutive.*site 'mu'"):
        b.fit(steps=9, batch_size=8, pilot_structures=2, max_bad_steps=3, objective="elbo", progress=False)


SIGNAL_RUN = """\
name: sig
model: model.py:normal_known
network: {hidden: 8}
structure: {levels: [group], groups: {group: [3, 5]}, obs: [2, 4]}
train: {steps: 1000000, batch_size: 4, pilot_structures: 1, log_every: 1000, warmup: 2, checkpoint_every: 2}
"""


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_signal_finishes_the_step_saves_and_exits_with_the_shells_code(tmp_path, signame, code):
    """``amortize train`` sent SIGTERM / SIGHUP mid-training: a loadable checkpoint, the resume
    command, exit code 128 + the signal."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from amortize.checkpoint import load_checkpoint

    (tmp_path / "c.yaml").write_text(SIGNAL_RUN)
    (tmp_path / "model.py").write_text(MODEL)
    cli = "import sys; from amortize.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", cli, "train", str(tmp_path / "c.yaml"), "--quiet", "--root", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("checkpoints/sig/*/checkpoint.pt")):  # step 2 written: the loop runs
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    (ck,) = tmp_path.glob("checkpoints/sig/*/checkpoint.pt")
    step = load_checkpoint(ck)["step"]
    assert step >= 2 and f"interrupted at step {step}; continue with: amortize train --resume" in err


def test_the_globals_standardizing_map_stays_the_pilots_fit(small_sampler):
    """Training moves q(globals)'s networks, not its standardizing map (the pilot's least squares):
    trained, the first steps' huge losses once pushed its log unit up ~9 on Mmmec, and the networks'
    smallest scale then held every q(globals) 10x wider than the prior."""
    from amortize.models import gaussian_2level

    a = am.Amortizer(gaussian_2level, small_sampler, hidden=8)
    a.fit(steps=1, batch_size=8, pilot_structures=2, progress=False)
    head = a.guide.global_head
    fitted = {n: p.detach().clone() for n, p in head.named_parameters() if not n.startswith(("net.", "spline."))}
    net = [p.detach().clone() for p in head.net.parameters()]
    assert fitted and any(float(p.abs().max()) > 0 for p in fitted.values())  # the pilot fitted something
    a.fit(steps=6, batch_size=8, pilot_structures=2, progress=False)
    assert all(torch.equal(p, fitted[n]) for n, p in head.named_parameters() if n in fitted)
    assert any(not torch.equal(p, q) for p, q in zip(head.net.parameters(), net))
