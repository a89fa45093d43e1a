"""End-to-end tests of the ``amortize`` command line on a tiny config (train once, reuse the run)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from amortize.checkpoint import load_checkpoint
from amortize.cli import _progress, build_parser, main
from amortize.config import load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
MODEL = """
import pyro
import pyro.distributions as dist


def normal_known(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], 0.5), obs=data.y)
"""
TINY = """\
name: tiny
model: model.py:normal_known
network: {hidden: 8}
structure: {levels: [group], groups: {group: [3, 5]}, obs: [2, 4]}
train: {steps: 6, batch_size: 8, pilot_structures: 2, log_every: 2, warmup: 2}
validate:
  num_samples: 100
  datasets: 1
  nuts: {num_warmup: 30, num_samples: 40, num_chains: 1, reparam: none, max_rhat: 1.5, min_ess: 5}
"""
DATA = "group,y\na,1.0\na,1.2\nb,0.3\nb,0.1\nb,0.5\nc,2.0\nc,2.1\n"


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``amortize argv``; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run: (run dir, stdout of ``amortize train``, data CSV)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.yaml").write_text(TINY)
    (root / "model.py").write_text(MODEL)
    (root / "d.csv").write_text(DATA)
    code, out, err = run_cli("train", root / "tiny.yaml", "--quiet", "--root", root)
    assert code == 0, err
    (run,) = (root / "checkpoints" / "tiny").iterdir()
    return run, out, root / "d.csv"


def test_train_writes_a_run(trained):
    run, out, _ = trained
    assert f"run: {run}" in out and "final loss" in out
    assert (run / "checkpoint.pt").is_file() and any((run / "tb").iterdir())
    cfg = load_config(run / "config.yaml")
    assert cfg.name == "tiny" and cfg.train.steps == 6 and cfg.validate.nuts.num_chains == 1
    assert Path(cfg.model.rsplit(":", 1)[0]) == (run.parents[2] / "model.py").resolve()  # snapshot is absolute
    assert load_checkpoint(run)["step"] == 6


def test_resume_continues_to_train_steps(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    code, out, err = run_cli("train", "--resume", run, "--quiet", "train.steps=9")
    assert code == 0, err
    assert "steps 6->9" in out
    assert load_checkpoint(run)["step"] == 9 and load_config(run / "config.yaml").train.steps == 6  # as started
    assert "train.steps=9" in (run / "history.yaml").read_text()  # the resume's override: recorded, applied
    code, out, _ = run_cli("train", "--resume", run)
    assert code == 0 and "already at step 9" in out


def test_sample_writes_csv_and_netcdf(trained, tmp_path):
    run, _, data = trained
    code, out, err = run_cli("sample", run, "--data", data, "--num-samples", 50, "--out", tmp_path / "d.csv")
    assert code == 0, err
    with open(tmp_path / "d.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["draw", "mu", "theta[0]", "theta[1]", "theta[2]"]
    assert len(rows) == 51 and all(r[0] == str(i) for i, r in enumerate(rows[1:]))
    code, _, err = run_cli("sample", run, "--data", data, "--num-samples", 30, "--out", tmp_path / "d.nc", "--quiet")
    assert code == 0, err
    az = pytest.importorskip("arviz")
    post = az.from_netcdf(tmp_path / "d.nc").posterior
    assert post["theta"].shape == (1, 30, 3) and list(post["group"].values) == ["a", "b", "c"]
    code, out, _ = run_cli("sample", run, "--data", data, "--num-samples", 30)
    assert code == 0 and "theta[b]" in out and "mean" in out


def test_validate_on_simulated_and_given_data(trained, tmp_path):
    run, _, data = trained
    code, out, err = run_cli("validate", run, "--json", tmp_path / "v.json", "--quiet")
    assert code == 0, err
    for col in ("level", "z_median", "z_p90", "sd_ratio_median", "coverage90", "amortized_s", "nuts_s", "speedup"):
        assert col in out
    report = json.loads((tmp_path / "v.json").read_text())
    assert [r["level"] for r in report["summary"]] == ["global", "group"]
    assert report["settings"]["datasets"] == 1 and report["settings"]["nuts"]["num_samples"] == 40
    assert report["nuts"][0]["ok"] and report["speedup"] > 0 and "held-out" in report["source"]
    assert {r["site"] for r in report["rows"]} == {"mu", "theta"} and "pareto_k" in report["diagnostics"][0]
    code, out, err = run_cli("validate", run, "--data", data, "--by", "site", "validate.num_samples=50", "--quiet")
    assert code == 0, err
    report = json.loads((run / "validate-d.json").read_text())  # named after the data file
    assert report["source"] == str(data) and report["name"] == "d" and "theta" in out and "site" in out
    assert report["settings"]["num_samples"] == 50


def test_validate_json_rows_name_groups_levels_and_the_rhat_threshold(trained, tmp_path):
    run, _, data = trained
    code, _, err = run_cli("validate", run, "--data", data, "--json", tmp_path / "v.json", "--quiet", "--figures", 0)
    assert code == 0, err
    report = json.loads((tmp_path / "v.json").read_text())
    rows = {(r["site"], r["group"]): r for r in report["rows"]}
    assert set(rows) == {("mu", None), ("theta", "a"), ("theta", "b"), ("theta", "c")}  # the CSV's group ids
    assert rows["mu", None]["level"] == "global" and rows["theta", "b"]["level"] == "group"
    for r in report["rows"]:
        assert r["element"] == [] and "index" not in r and "covered90" not in r and 0 <= r["coverage90"] <= 1
        assert r["sd"] > 0 and r["ref_sd"] > 0
        assert r["z"] == pytest.approx(abs(r["mean"] - r["ref_mean"]) / r["ref_sd"])
        assert r["sd_ratio"] == pytest.approx(r["sd"] / r["ref_sd"])
    assert [s["level"] for s in report["summary"]] == ["global", "group"] and "coverage90" in report["summary"][0]
    (checks,) = report["nuts"]
    assert set(checks["r_hat_threshold"]) == {"mu", "theta"} == set(checks["r_hat"])
    assert checks["r_hat_threshold"]["mu"] == 1.5  # the config's max_rhat, for a site of one element
    assert checks["r_hat_threshold"]["theta"] > 1.5  # raised for the 3 elements of theta
    assert all(checks["r_hat"][s] < checks["r_hat_threshold"][s] for s in checks["r_hat"]) == checks["ok"]


def test_validations_have_their_own_names(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    for argv in ([], ["--data", trained[2]], ["--data", trained[2], "--name", "again"]):
        code, _, err = run_cli("validate", run, *argv, "--quiet", "--figures", 0)
        assert code == 0, err
    names = sorted(p.name for p in run.glob("validate*.json"))
    assert names == ["validate-again.json", "validate-d.json", "validate-heldout.json"]
    assert json.loads((run / "validate-heldout.json").read_text())["source"].startswith("1 held-out")
    code, out, err = run_cli("validate", run, "--name", "../x", "--quiet")
    assert code == 2 and out == "" and "--name '../x'" in err and err.count("\n") == 1


def bad_case(tmp_path: Path, name: str) -> list[str]:
    """Arguments of ``amortize train`` that must fail with exit code 2."""
    (tmp_path / "es.csv").write_text("school,y,sigma\n1,28,15\n2,8,10\n")
    es = textwrap.dedent(
        """\
        model: amortize.models:eight_schools
        structure: {data: es}
        data: {es: {path: %s, levels: [school], covariates: {obs: [%s]}}}
        """
    )
    texts = {
        "unknown_key": TINY + "trian: {steps: 3}\n",
        "wrong_type": TINY.replace("hidden: 8", "hidden: wide"),
        "missing_model": TINY.replace("model: model.py:normal_known\n", ""),
        "missing_data_file": es % ("nope.csv", "sigma"),
        "column_typo": es % ("es.csv", "sigmaa"),
        "model_not_found": TINY.replace("model.py:normal_known", "amortize.modelz:f"),
    }
    (tmp_path / "c.yaml").write_text(texts[name])
    return ["train", str(tmp_path / "c.yaml"), "--quiet", "--root", str(tmp_path)]


@pytest.mark.parametrize(
    "name, expect",
    [
        ("unknown_key", "unknown key 'trian'"),
        ("wrong_type", "network.hidden"),
        ("missing_model", "key 'model' is required"),
        ("missing_data_file", "data.es.path: no such data file 'nope.csv'"),
        ("column_typo", "column 'sigmaa' is not in the data"),
        ("model_not_found", "module 'amortize.modelz' not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, name, expect):
    code, out, err = run_cli(*bad_case(tmp_path, name))
    assert code == 2 and out == ""
    assert err.startswith("amortize: error: ") and err.count("\n") == 1, err
    assert expect in err and "c.yaml" in err
    assert not (tmp_path / "checkpoints").exists()  # nothing half-written


def test_bad_override_and_debug_traceback(trained, tmp_path):
    code, _, err = run_cli("train", trained[2].parent / "tiny.yaml", "train.stepz=3", "--root", tmp_path)
    assert code == 2 and "unknown key 'train.stepz'" in err and "Traceback" not in err
    code, _, err = run_cli("--debug", "train", trained[2].parent / "tiny.yaml", "train.stepz=3", "--root", tmp_path)
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("(Did you mean: 'steps'?)")


def test_sample_and_validate_errors(trained, tmp_path):
    run, _, data = trained
    cases = [
        (("sample", run, "--data", tmp_path / "nope.csv"), "--data: no such data file"),
        (("sample", run, "--data", data, "--response", "yy"), "column 'yy' is not in the data"),
        (("sample", run, "--data", data, "--out", tmp_path / "x.txt"), "must end in .nc"),
        (("sample", tmp_path, "--data", data), "not a run directory"),
        (("validate", run, "validate.nuts.reparam=maybe"), "validate.nuts.reparam"),
    ]
    for argv, expect in cases:
        code, _, err = run_cli(*argv)
        assert code == 2 and expect in err and err.count("\n") == 1, (argv, err)


@pytest.mark.parametrize("command", ["train", "sample", "ppc", "validate", "sbc", "bench"])
def test_help_shows_an_example(command):
    code, out, _ = run_cli(command, "--help")
    assert code == 0 and "example" in out and f"amortize {command}" in out


def test_progress_off_with_quiet_or_ci(monkeypatch):
    parser = build_parser()
    monkeypatch.delenv("CI", raising=False)
    assert _progress(parser.parse_args(["train", "c.yaml"]))
    assert not _progress(parser.parse_args(["train", "c.yaml", "--quiet"]))
    monkeypatch.setenv("CI", "true")
    assert not _progress(parser.parse_args(["train", "c.yaml"]))


def test_usage_errors_exit_2():
    assert run_cli()[0] == 2
    assert run_cli("train", "--resume", "somewhere", "other.yaml")[0] == 2
    assert run_cli("sample", "run")[0] == 2  # --data is required


def test_experiment_configs_train_one_step(tmp_path):
    """Every shipped config builds its model and sampler and trains (one tiny step)."""
    tiny = ["train.steps=1", "train.refine_steps=1", "train.batch_size=2", "train.pilot_structures=1"]
    tiny.append("network.hidden=4")
    torch.manual_seed(0)
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        code, out, err = run_cli("train", path, *tiny, "--quiet", "--run-dir", tmp_path / path.stem)
        assert code == 0, (path.name, err)
        assert (tmp_path / path.stem / "checkpoint.pt").is_file()


def tensorboard_tags(run: Path) -> dict[str, list[str]]:
    """Image and scalar tags of all events files in ``run/tb``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


def test_validate_writes_figures_and_shows_nuts_progress(trained, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from amortize.validate import nuts

    run, data = tmp_path / "run", trained[2]
    shutil.copytree(trained[0], run)
    progress, real = [], nuts.run_nuts

    def spy(*args, **kwargs):
        progress.append(kwargs["progress"])
        return real(*args, **{**kwargs, "progress": False})

    monkeypatch.setattr(nuts, "run_nuts", spy)
    monkeypatch.delenv("CI", raising=False)
    code, out, err = run_cli("validate", run, "--data", data)
    assert code == 0, err
    assert progress == [True] and f"wrote 3 figures to {run / 'tb'} under validate/d/" in out
    tags = tensorboard_tags(run)
    assert {"validate/d/mu", "validate/d/theta", "validate/d/pairs"} <= set(tags["images"])
    assert "validate/d/pareto_k_max" in tags["scalars"]
    assert {"validate/d/global/z_p90", "validate/d/group/sd_ratio_median", "train/loss"} <= set(tags["scalars"])
    code, out, err = run_cli("validate", run, "--quiet")  # held-out datasets: tagged per dataset, no progress
    assert code == 0 and progress == [True, False], err
    tags = tensorboard_tags(run)
    assert {"validate/heldout/dataset_0/mu", "validate/heldout/dataset_0/theta"} <= set(tags["images"])
    assert {"validate/heldout/recovery", "validate/heldout/contraction"} <= set(tags["images"])
    assert {"validate/heldout/global/z_p90", "validate/d/global/z_p90"} <= set(tags["scalars"])  # both kept
    code, out, err = run_cli("validate", run, "--figures", "0", "--quiet")
    assert code == 0 and "figures to" not in out


def test_sbc_adds_its_plots_to_tensorboard(trained, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    code, out, err = run_cli("sbc", run, "--datasets", 8, "--num-samples", 9, "--quiet")
    assert code in (0, 1), err  # 1: a quantity failed (6 training steps); the plots come either way
    assert f"wrote sbc/ecdf, sbc/hist and 3 p-values (sbc/<quantity>/p_value) to {run / 'tb'}" in out
    assert "sbc/mu/p_value" in tensorboard_tags(run)["scalars"]
    assert {"sbc/ecdf", "sbc/hist"} <= set(tensorboard_tags(run)["images"])


def test_bench_against_nuts_on_held_out_datasets(trained, tmp_path):
    run = trained[0]
    code, out, err = run_cli("bench", run, "--quiet", "--num-samples", 50, "--json", tmp_path / "b.json")
    assert code == 0, err
    for col in ("run", "against", "level", "z_p90", "sd_ratio_median", "pareto_k", "nuts_s", "speedup"):
        assert col in out.splitlines()[0]
    assert "tiny/" in out and "NUTS, 1 held-out" in out
    (entry,) = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert [s["level"] for s in entry["summary"]] == ["global", "group"] and entry["speedup"] > 0
    assert entry["settings"]["num_samples"] == 50 and entry["settings"]["nuts"]["num_samples"] == 40


def test_bench_against_a_reference_posterior(tmp_path):
    pytest.importorskip("matplotlib")
    from amortize.validate import reference

    try:
        reference.eight_schools()
    except reference.ReferenceNotFoundError as e:
        pytest.skip(str(e))
    tiny = [
        "train.steps=2",
        "train.refine_steps=2",
        "train.batch_size=4",
        "train.pilot_structures=1",
        "network.hidden=4",
    ]
    run = tmp_path / "es"
    code, _, err = run_cli("train", EXPERIMENTS / "eight_schools.yaml", *tiny, "--quiet", "--run-dir", run)
    assert code == 0, err
    code, out, err = run_cli("bench", run, "--num-samples", 200, "--quiet")
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("eight_schools/es")]
    assert len(lines) == 2 and all("posteriordb" in ln for ln in lines) and "school" in lines[1]
    entry = json.loads((run / "bench.json").read_text())
    assert entry["nuts_seconds_per_dataset"] is None and len(entry["rows"]) == 10  # mu, tau, 8 thetas
    assert {"bench/mu", "bench/tau", "bench/theta"} <= set(tensorboard_tags(run)["images"])


def test_bench_errors_exit_2_with_one_line(trained, tmp_path):
    cases = [
        (("bench", trained[0], "--against", "reference"), "no reference posterior for model"),
        (("bench", tmp_path), "not a run directory"),
    ]
    for argv, expect in cases:
        code, out, err = run_cli(*argv)
        assert code == 2 and out == "" and expect in err and err.count("\n") == 1, (argv, err)


def test_validate_refuses_a_response_outside_the_support(tmp_path):
    """``validate --data`` checks the response as ``sample`` does, before any NUTS run."""
    poisson = MODEL.replace(
        'dist.Normal(theta[..., data.index("group")], 0.5)', 'dist.Poisson(theta[..., data.index("group")].exp())'
    )
    assert "Poisson" in poisson
    (tmp_path / "model.py").write_text(poisson)
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "d.csv").write_text(DATA)  # 1.2, 0.3, ...: not counts
    code, _, err = run_cli("train", tmp_path / "tiny.yaml", "--quiet", "--run-dir", tmp_path / "p")
    assert code == 0, err
    code, out, err = run_cli("validate", tmp_path / "p", "--data", tmp_path / "d.csv", "--quiet")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{tmp_path / 'd.csv'}: response 'y'" in err and "outside the support" in err


def test_sample_correct_writes_k_its_spread_and_the_decision(trained, tmp_path):
    """``--correct --num-samples --seed``: the .nc carries the full InferenceData and the command's
    diagnostics (pooled k, one k per set, ok, reason); the same seed gives the same file; the .csv
    gets a diagnostics JSON beside it; the printed summary ends with the k line, and with ``--local-sbc``
    the local SBC line after it."""
    az = pytest.importorskip("arviz")
    run, _, data = trained
    argv = ("sample", run, "--data", data, "--num-samples", 60, "--seed", 3, "--correct", "--quiet")
    for name in ("a.nc", "b.nc"):
        code, out, err = run_cli(*argv, "--out", tmp_path / name)
        assert code == 0, err
        assert "wrote 60" in out and ("(ok)" in out or "NOT ok" in out)
    a, b = az.from_netcdf(tmp_path / "a.nc"), az.from_netcdf(tmp_path / "b.nc")
    assert {"posterior", "sample_stats", "log_likelihood", "posterior_predictive", "observed_data"} <= set(a.groups())
    attrs = a.sample_stats.attrs
    assert len(attrs["diagnostics_pareto_k_sets"]) == 4 and attrs["diagnostics_num_samples"] == 400  # 4 x 100
    assert attrs["diagnostics_ok"] in (0, 1) and attrs["diagnostics_reason"] and "pareto_k" in attrs
    assert (attrs["diagnostics_reason"] == "ok") == bool(attrs["diagnostics_ok"])
    assert float(a.posterior["mu"].mean()) == float(b.posterior["mu"].mean())
    code, _, err = run_cli(
        "sample", run, "--data", data, "--num-samples", 40, "--k-sets", 2, "--out", tmp_path / "d.csv"
    )
    assert code == 0, err
    record = json.loads((tmp_path / "d.diagnostics.json").read_text())
    assert len(record["pareto_k_sets"]) == 2 and record["draws"] == 40 and record["corrected"] is False
    assert "2 sets of 100 draws" in err  # global draws: at least 100 per set
    code, out, _ = run_cli("sample", run, "--data", data, "--num-samples", 40)
    lines = out.strip().splitlines()
    assert lines[0].split() == ["mean", "sd", "5%", "95%", "mcse_mean", "mcse_sd", "ess"]
    assert lines[-1].startswith("pareto k ") and "4 sets of 100 draws" in lines[-1] and "local SBC" not in out
    code, out, _ = run_cli("sample", run, "--data", data, "--num-samples", 40, "--local-sbc")
    lines = out.strip().splitlines()
    assert lines[-2].startswith("pareto k ") and lines[-1].startswith("local SBC (reported, not deciding;")
    assert "passed" in lines[-1] or "outside its band" in lines[-1]


def test_ppc_prints_p_values_per_level_and_writes_json_and_png(trained, tmp_path):
    run, _, data = trained
    code, out, err = run_cli("ppc", run, "--data", data, "--num-samples", 100, "--json", tmp_path / "p.json")
    assert code == 0, err
    report = json.loads((tmp_path / "p.json").read_text())
    stats = [r["statistic"] for r in report["rows"]]
    assert stats == [f"y: {s}" for s in ("mean", "sd", "min", "max")] + [
        f"group means: {s}" for s in ("mean", "sd", "min", "max")
    ]
    assert all(0 <= r["p_value"] <= 1 for r in report["rows"]) and report["num_samples"] == 100
    assert "group means: sd" in out and "p_value" in out
    if (tmp_path / "p.png").exists() is False:
        pytest.importorskip("matplotlib")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_validate_seed_and_num_samples_flags(trained, tmp_path):
    run, _, data = trained
    code, _, err = run_cli(
        "validate",
        run,
        "--seed",
        7,
        "--num-samples",
        30,
        "--k-sets",
        3,
        "--json",
        tmp_path / "v.json",
        "--quiet",
        "--figures",
        0,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["settings"]["seed"] == 7 and report["settings"]["num_samples"] == 30
    # Pareto k of every held-out dataset from 3 independent sets of 30 draws, pooled
    assert all(len(d["pareto_k_sets"]) == 3 and d["num_samples"] == 300 for d in report["diagnostics"])  # 3 x 100


def test_command_line_ux(trained, tmp_path):
    """The run folder is printed once; no warning points at the command that prints it; a response or
    level column missing from --data says it came from the config; every option has a help text."""
    run, out, data = trained
    code, out, err = run_cli("train", data.parent / "tiny.yaml", "--root", tmp_path)
    assert code == 0 and (out + err).count("run: ") == 1
    code, _, err = run_cli("validate", run, "--data", data, "--quiet", "--figures", 0, "--name", "ux")
    assert code == 0 and "validate --data" not in err
    (tmp_path / "r.csv").write_text(DATA.replace("group,y", "group,resp"))
    code, _, err = run_cli("sample", run, "--data", tmp_path / "r.csv")
    assert code == 2 and "column 'y' is not in the data" in err and "--response COLUMN" in err
    (tmp_path / "l.csv").write_text(DATA.replace("group,y", "clinic,y"))
    code, _, err = run_cli("sample", run, "--data", tmp_path / "l.csv")
    assert code == 2 and "--levels" in err and err.count("\n") == 1
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help or action.dest == "help", (name, action.dest)


def test_a_plate_the_data_lacks_is_one_line_without_a_trace_dump(tmp_path):
    (tmp_path / "model.py").write_text(MODEL.replace('"group"', '"school"'))
    (tmp_path / "tiny.yaml").write_text(TINY)
    code, out, err = run_cli("train", tmp_path / "tiny.yaml", "--root", tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "unknown level 'school'; levels are ['group']" in err and "Trace Shapes" not in err and "Sites" not in err
    assert not (tmp_path / "checkpoints").exists()


def test_progress_bars_turn_off_off_a_terminal_and_leave_no_frame():
    """Every tqdm bar of the package: ``disable=None`` when progress is on (tqdm turns itself off when
    stderr is not a terminal: no bar frames in piped logs) and ``leave=False`` (never glued to the next line)."""
    import ast

    calls = []
    for path in (Path(__file__).resolve().parents[1] / "amortize").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "tqdm":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((path.name, kw))
    assert len(calls) >= 3
    for name, kw in calls:
        assert "None" in kw.get("disable", "") and kw.get("leave") == "False", (name, kw)


def test_main_job_help_documents_the_defaults_it_uses():
    """``scripts/main.sh --help`` (experiments/main.py): each option's help states the default the parser
    applies, and the usage line in the docstring quotes the same numbers."""
    import re
    import subprocess
    import sys

    main_py = EXPERIMENTS / "main.py"
    out = subprocess.run([sys.executable, str(main_py), "--help"], capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.split())
    for flag, default in (("--steps", 5000), ("--datasets", 10), ("--draws", 1000), ("--batch-size", 64)):
        assert re.search(rf"{flag} \S+ [^()]*\(default: {default}\)", flat), flag
    for flag, value in re.findall(r"\[(--[a-z-]+) (\d+)\]", flat):
        assert re.search(rf"{flag} \S+ [^()]*\(default: {value}\)", flat), (flag, value)


def test_k_line_with_sets_too_small_to_estimate_k():
    from amortize.validate.draw_checks import k_line

    nan = float("nan")
    diag = {"pareto_k": 0.96, "pareto_k_sets": [nan] * 4, "ess": 5.6, "num_samples": 80, "ok": False, "reason": "r"}
    assert k_line(diag) == (
        "pareto k 0.96 (4 sets of 20 draws: too few draws per set to estimate), importance ESS 6/80: NOT ok (r)"
    )
    one = {**diag, "pareto_k_sets": [0.3], "pareto_k": 0.3, "ok": True}
    assert k_line(one) == "pareto k 0.30, importance ESS 6/80: ok"
    shifted = {**one, "shift": {"z": 0.123, "se": 0.05, "sd_ratio": 1.1, "site": "beta[1]"}}
    assert k_line(shifted) == "pareto k 0.30, importance ESS 6/80, globals' shift 0.12 sd ('beta[1]'): ok"
    assert k_line({**shifted, "pareto_k": 0.96, "ok": False}).endswith("ESS 6/80: NOT ok (r)")  # unusable k: no shift
