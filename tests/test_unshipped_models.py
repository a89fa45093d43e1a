"""The models the library does not ship (experiments/models/unshipped.py), from their configs: each traces,
simulates finite data, trains a few NPE steps and draws finite samples of every latent site."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import amortize as am
from amortize.config import config_dir, config_source, load_config
from amortize.errors import ConfigError
from amortize.experiment import build_sampler
from amortize.modelspec import resolve_model

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
MODELS = [
    "studentt_dof",
    "negbin_exposure",
    "gamma_log",
    "binomial_trials",
    "studentt_prior",
    "lognormal_scale",
    "negbin_3level",
]


def _amortizer(name: str) -> am.Amortizer:
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    model = resolve_model(cfg.model, config_dir(cfg), config_source(cfg))
    return am.Amortizer(model, build_sampler(cfg), hidden=16, seed=0)


@pytest.mark.parametrize("name", MODELS)
def test_unshipped_model_trains_and_draws_finite_samples(name: str) -> None:
    torch.manual_seed(0)
    a = _amortizer(name)
    sim = a.simulate_batch(torch.Generator().manual_seed(1), 4)
    assert torch.isfinite(sim.data.y).all()
    assert {s.name for s in a.structure.latents} == set(sim.latents)
    a.fit(steps=3, batch_size=8, progress=False)
    draws = a.posterior(sim.data, seed=2).sample(20)
    assert set(draws) == {s.name for s in a.structure.latents}
    for site, d in draws.items():
        assert d.shape[:2] == (20, 4), site
        assert torch.isfinite(d).all(), site


def test_binomial_trials_are_integers_within_the_configured_range() -> None:
    a = _amortizer("binomial_trials")
    sim = a.simulate_batch(torch.Generator().manual_seed(3), 4)
    trials = sim.data.x["trials"]
    assert torch.equal(trials, trials.round()) and trials.min() >= 1 and trials.max() <= 20
    assert (sim.data.y <= trials).all() and (sim.data.y >= 0).all()


def test_negbin_3level_structures_have_singleton_groups() -> None:
    a = _amortizer("negbin_3level")
    gen = torch.Generator().manual_seed(4)
    one_row = one_hospital = 0
    for _ in range(20):
        d = a.sampler.sample(gen)
        one_row += int((d.counts("hospital") == 1).sum())
        one_hospital += int((torch.bincount(d.parent_index("hospital")) == 1).sum())
    assert one_row > 0 and one_hospital > 0


def test_integer_covariate_with_fractional_bounds_is_refused(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "model: amortize.models:gaussian_2level\nstructure: {levels: [group], groups: {group: [2, 3]}, obs: [1, 2],"
        " covariates: {obs: {n: {dist: integer, low: 1, high: 2.5}}}}\n"
    )
    with pytest.raises(ConfigError, match="whole numbers"):
        build_sampler(load_config(cfg_path))
