"""Faults in the config and the model file: every numeric option outside its range, and a model file
that exits at import, end ``amortize train`` with one line naming the key (or file), exit code 2, and
no run folder."""

from __future__ import annotations

import pytest

import amortize as am
from amortize.config import load_config
from amortize.errors import ConfigError
from amortize.limits import Limit

from .test_cli import MODEL, TINY, run_cli


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "model.py").write_text(MODEL)
    return tmp_path / "tiny.yaml"


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("train.clip_norm=-1", "train.clip_norm", "> 0"),
        ("train.lr_final_ratio=-3", "train.lr_final_ratio", ">= 0 and <= 1"),
        ("validate.nuts.target_accept=2", "validate.nuts.target_accept", "> 0 and < 1"),
        ("train.lr=-1", "train.lr", "> 0 and finite"),
        ("train.lr=nan", "train.lr", "> 0 and finite"),
        ("train.refine_lr=inf", "train.refine_lr", "> 0 and finite"),
        ("train.checkpoint_every=0", "train.checkpoint_every", ">= 1"),
        ("train.log_every=0", "train.log_every", ">= 1"),
        ("train.pilot_structures=0", "train.pilot_structures", ">= 1"),
        ("train.warmup=-1", "train.warmup", ">= 0"),
        ("seed=-1", "seed", ">= 0 and <= 4.29497e+09"),
        ("validate.seed=-5", "validate.seed", ">= 0"),
        ("validate.nuts.max_rhat=0.9", "validate.nuts.max_rhat", ">= 1"),
    ],
)
def test_option_outside_its_range_exits_2_naming_the_key(tiny, override, key, allowed):
    code, out, err = run_cli("train", tiny, override, "--quiet", "--root", tiny.parent)
    assert code == 2 and out == ""
    assert err.startswith(f"amortize: error: {tiny}: {key}: must be {allowed}") and err.count("\n") == 1, err
    assert f", got {override.split('=')[1]}" in err.replace(".0\n", "\n")
    assert not (tiny.parent / "checkpoints").exists()  # no run folder, no config without a checkpoint
    with pytest.raises(ConfigError, match=rf"tiny\.yaml: {key}: must be "):
        load_config(tiny, [override])


def test_train_config_checks_its_ranges_from_python_too():
    with pytest.raises(ConfigError, match=r"^lr: must be > 0 and finite, got -1"):
        am.TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"^clip_norm: must be > 0, got nan"):
        am.TrainConfig(clip_norm=float("nan"))
    assert am.TrainConfig(clip_norm=float("inf")).clip_norm == float("inf")  # inf: no clipping


def test_limit_bounds():
    unit = Limit(0, 1, open_low=True, open_high=True)
    assert [unit.allows(v) for v in (0, 0.5, 1, float("nan"), None, True, "0.5")] == [0, 1, 0, 0, 0, 0, 0]
    assert Limit(0, optional=True).allows(None) and not Limit(0).allows(float("inf"))


def test_model_file_that_exits_at_import_is_named(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "model.py").write_text("import sys\nsys.exit(3)\n")
    code, out, err = run_cli("train", tmp_path / "tiny.yaml", "--quiet", "--root", tmp_path)
    assert code == 2 and out == ""
    assert "model.py' raised SystemExit(3) while it was imported" in err and err.count("\n") == 1, err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "spec, key, expect",
    [
        ("{dist: normal, scale: -1}", "structure.covariates.obs.x.scale", "must be >= 0 and finite, got -1"),
        ("{dist: bernoulli, p: 1.5}", "structure.covariates.obs.x.p", "must be >= 0 and <= 1, got 1.5"),
        ("{dist: normal, loc: .nan}", "structure.covariates.obs.x.loc", "must be a number and finite, got nan"),
        ("{dist: uniform, low: 2, high: 1}", "structure.covariates.obs.x", "low 2 is above high 1"),
    ],
)
def test_covariate_distribution_outside_its_range_is_named(tmp_path, spec, key, expect):
    text = TINY.replace("obs: [2, 4]}", "obs: [2, 4], covariates: {obs: {x: " + spec + "}}}")
    (tmp_path / "tiny.yaml").write_text(text)
    (tmp_path / "model.py").write_text(MODEL)
    code, _, err = run_cli("train", tmp_path / "tiny.yaml", "--quiet", "--root", tmp_path)
    assert code == 2 and f"tiny.yaml: {key}: {expect}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "checkpoints").exists()


def test_model_that_exits_while_traced_is_named(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "model.py").write_text(
        MODEL.replace("    mu = pyro.sample", "    raise SystemExit(4)\n    mu = pyro.sample")
    )
    code, out, err = run_cli("train", tmp_path / "tiny.yaml", "--quiet", "--root", tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("amortize: error: train: SystemExit(4) was raised at ") and "model.py:" in err
    assert not (tmp_path / "checkpoints").exists()
