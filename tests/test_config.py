"""Tests of amortize.config: schema validation, overrides, model resolution, samplers and datasets."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import amortize.models as models
from amortize.config import Config, config_dir, config_source, load_config, save_config
from amortize.errors import ConfigError, DataError
from amortize.experiment import build_sampler, dataset_spec, load_dataset
from amortize.modelspec import resolve_model
from amortize.train import TrainConfig

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
MODEL_FILE = """
import pyro
import pyro.distributions as dist

def my_model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], 1.0), obs=data.y)
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", sorted(models.SAMPLERS))
def test_experiment_configs_match_shipped_samplers(name):
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    assert cfg.name == name
    assert resolve_model(cfg.model, config_dir(cfg)) is getattr(models, name)
    sampler, reference = build_sampler(cfg), models.SAMPLERS[name]()
    assert sampler.ranges() == reference.ranges()
    gen = torch.Generator().manual_seed(0)
    got, want = sampler.sample(gen), reference.sample(torch.Generator().manual_seed(0))
    assert got.structure_signature() == want.structure_signature()
    raw = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())["train"]
    assert isinstance(cfg.train, TrainConfig)
    assert (cfg.train.steps, cfg.train.batch_size) == (raw["steps"], raw["batch_size"])


def test_eight_schools_dataset_is_the_posteriordb_data():
    cfg = load_config(EXPERIMENTS / "eight_schools.yaml")
    data = load_dataset(cfg, "eight_schools")
    assert data.y.tolist() == [28, 8, -3, 7, -1, 1, 18, 12]
    assert data.x["sigma"].tolist() == [15, 10, 16, 11, 9, 11, 10, 18]
    assert data.size("school") == 8


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path / "c.yaml", "model: amortize.models:gaussian_2level\n"),
        ["train.steps=7", "network.hidden=8", "validate.nuts.num_chains=1", "structure.obs=[2,3]"],
    )
    assert isinstance(cfg, Config)
    assert (cfg.train.steps, cfg.network.hidden, cfg.validate.nuts.num_chains) == (7, 8, 1)
    assert cfg.structure.obs == [2, 3] and cfg.structure.groups == {"group": [10, 50]}
    assert cfg.seed == 0 and cfg.device == "cpu" and cfg.validate.datasets == 10
    assert config_source(cfg) == str(tmp_path / "c.yaml")


def test_file_groups_replace_the_default_ranges(tmp_path):
    cfg = load_config(
        write(
            tmp_path / "c.yaml",
            """\
            model: amortize.models:gaussian_3level
            structure: {levels: [district, school], groups: {district: [2, 3], school: [1, 2]}}
            """,
        )
    )
    assert cfg.structure.groups == {"district": [2, 3], "school": [1, 2]}
    assert build_sampler(cfg).ranges()["school"] == [1, 2]
    assert not build_sampler(cfg).vary_sizes
    assert build_sampler(load_config(config_source(cfg), ["structure.vary_sizes=true"])).vary_sizes


def test_snapshot_round_trips_from_another_folder(tmp_path, monkeypatch):
    write(tmp_path / "cfg" / "models.py", MODEL_FILE)
    write(tmp_path / "cfg" / "d.csv", "group,y\n1,0.5\n2,1.5\n")
    src = write(
        tmp_path / "cfg" / "c.yaml",
        """\
        model: models.py:my_model
        data: {d: {path: d.csv, levels: [group]}}
        """,
    )
    cfg = load_config(src)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    monkeypatch.chdir(tmp_path)
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again.train == cfg.train and again.data == cfg.data and again.model == cfg.model
    assert resolve_model(again.model, config_dir(again)).__name__ == "my_model"
    assert load_dataset(again, "d").size("group") == 2


@pytest.mark.parametrize(
    "text, overrides, expect",
    [
        ("model: m:f\ntrain: {stepz: 3}\n", [], ["train.stepz", "c.yaml", "steps"]),
        ("model: m:f\n", ["network.hiden=3"], ["network.hiden", "c.yaml"]),
        ("model: m:f\ntrain: {steps: many}\n", [], ["train.steps", "c.yaml", "many"]),
        ("model: m:f\n", ["seed=abc"], ["seed", "abc"]),
        ("name: x\n", [], ["model", "required", "c.yaml"]),
        ("model: m:f\n", ["train.steps"], ["train.steps", "key=value"]),
        ("model: m:f\ntrain: {objective: kl}\n", [], ["train.objective", "c.yaml"]),
        ("model: m:f\ntrain: {steps: 0}\n", [], ["train.steps", "c.yaml"]),
        ("model: nocolon\n", [], ["model", "nocolon"]),
        ("model: m:f\nstructure: {data: radon}\n", [], ["structure.data", "radon"]),
        ("model: m:f\ndata: {d: {levels: [g]}}\n", [], ["data.d.path", "required"]),
        ("model: m:f\nvalidate: {nuts: {reparam: maybe}}\n", [], ["validate.nuts.reparam", "maybe"]),
        ("- a\n- b\n", [], ["c.yaml", "mapping"]),
        ("model: [unclosed\n", [], ["c.yaml", "YAML"]),
    ],
)
def test_bad_configs_name_the_key_and_file(tmp_path, text, overrides, expect):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "c.yaml", text), overrides)
    msg = str(info.value)
    assert "\n" not in msg
    for word in expect:
        assert word in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "structure, expect",
    [
        ("{levels: [a, b], groups: {a: [1, 2]}}", "structure.groups: no [lo, hi] range for level 'b'"),
        ("{levels: [a], groups: {a: [3, 1]}}", "structure.groups.a"),
        ("{levels: [a], groups: {a: [1, 2], b: [1, 2]}}", "structure.groups.b: not a level"),
        ("{obs: [0, 3]}", "structure.obs"),
        ("{covariates: {obs: {x: {dist: gamma}}}}", "structure.covariates.obs.x.dist: unknown 'gamma'"),
        ("{covariates: {obs: {x: {dist: normal, sd: 1}}}}", "unknown parameter(s) ['sd']"),
        ("{covariates: {obs: {x: {dist: uniform, low: a}}}}", "structure.covariates.obs.x.low"),
        ("{covariates: {county: {u: {dist: normal}}}}", "structure.covariates.county: not a level"),
    ],
)
def test_bad_structures(tmp_path, structure, expect):
    cfg = load_config(write(tmp_path / "c.yaml", f"model: m:f\nstructure: {structure}\n"))
    with pytest.raises(ConfigError) as info:
        build_sampler(cfg)
    assert expect in str(info.value) and "c.yaml" in str(info.value)


def test_sampler_with_covariates(tmp_path):
    cfg = load_config(
        write(
            tmp_path / "c.yaml",
            "model: m:f\nstructure: {covariates: {obs: {x: {dist: bernoulli, p: 0.3}}, group: {u: {}}}}\n",
        )
    )
    data = build_sampler(cfg).sample(torch.Generator().manual_seed(0))
    assert set(data.x) == {"x", "u"} and set(data.x["x"].unique().tolist()) <= {0.0, 1.0}
    assert dataset_spec(cfg).covariates == {"obs": ["x"], "group": ["u"]}


def test_resolve_model_from_module_and_file(tmp_path, monkeypatch):
    assert resolve_model("amortize.models:eight_schools") is models.eight_schools
    write(tmp_path / "cfgdir" / "m.py", MODEL_FILE)
    assert resolve_model("m.py:my_model", tmp_path / "cfgdir").__name__ == "my_model"
    monkeypatch.chdir(tmp_path)
    assert resolve_model("cfgdir/m.py:my_model", tmp_path / "elsewhere").__name__ == "my_model"
    cfg = load_config(write(tmp_path / "cfgdir" / "c.yaml", "model: m.py:my_model\n"))
    assert Path(cfg.model.rsplit(":", 1)[0]).is_absolute()


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("amortize.modelz:f", "module 'amortize.modelz' not found"),
        ("amortize.models:nope", "no function 'nope' in module 'amortize.models' (it defines: eight_schools"),
        ("missing/m.py:f", "model file 'missing/m.py' not found"),
        ("broken.py:f", "importing"),
        ("good.py:other", "no function 'other' in file"),
        ("amortize.models:", "is not 'package.module:function'"),
    ],
)
def test_resolve_model_errors(tmp_path, spec, expect):
    write(tmp_path / "broken.py", "import pyro\nraise RuntimeError('boom in user code')\n")
    write(tmp_path / "good.py", MODEL_FILE)
    with pytest.raises(ConfigError) as info:
        resolve_model(spec, tmp_path, source="c.yaml")
    msg = str(info.value)
    assert msg.startswith("c.yaml: model") and expect in msg and "\n" not in msg
    if spec.startswith("broken"):
        assert "RuntimeError: boom in user code" in msg


def test_dataset_errors_name_key_file_and_column(tmp_path):
    write(tmp_path / "d.csv", "school,y,sigma\n1,1.0,2.0\n2,3.0,4.0\n")
    cfg = load_config(
        write(
            tmp_path / "c.yaml",
            """\
            model: m:f
            data:
              ok: {path: d.csv, levels: [school], covariates: {obs: [sigma]}}
              typo: {path: d.csv, levels: [school], covariates: {obs: [sigmaa]}}
              gone: {path: nope.csv, levels: [school]}
            """,
        )
    )
    assert load_dataset(cfg, "ok").x["sigma"].tolist() == [2.0, 4.0]
    with pytest.raises(DataError, match=r"c.yaml: data.typo: .*d.csv: column 'sigmaa' is not in the data"):
        load_dataset(cfg, "typo")
    with pytest.raises(ConfigError, match=r"c.yaml: data.gone.path: no such data file 'nope.csv'"):
        load_dataset(cfg, "gone")
    with pytest.raises(ConfigError, match="no entry 'other'"):
        load_dataset(cfg, "other")
