"""Faults around ``amortize train`` / ``sample`` run folders: two writers on one run, a resume that
would change what the checkpoint was trained with, a disk full at the start, a run that fails before
its first checkpoint. Each exits 2 with one line naming the culprit, and leaves nothing half-made."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import amortize.checkpoint as checkpoint_module
from amortize.checkpoint import load_checkpoint
from amortize.config import load_config
from amortize.rundir import locked

from .test_cli import DATA, MODEL, TINY, run_cli

POISSON = (
    MODEL
    + """

def pois(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Poisson(theta[..., data.index("group")].exp()), obs=data.y)


def all_infinite(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")] * float("inf"), 0.5), obs=data.y)
"""
)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def root(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "model.py").write_text(POISSON)
    (tmp_path / "d.csv").write_text(DATA)
    return tmp_path


@pytest.fixture
def run(root):
    """A finished tiny run (6 steps) in ``root/run``."""
    code, _, err = run_cli("train", root / "tiny.yaml", "--quiet", "--run-dir", root / "run")
    assert code == 0, err
    return root / "run"


def test_second_writer_on_one_run_folder_exits_2_naming_the_holder(root):
    folder = root / "run"
    folder.mkdir()
    with locked(folder):  # a first 'amortize train' is writing this folder
        code, out, err = run_cli("train", root / "tiny.yaml", "--quiet", "--run-dir", folder)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"another 'amortize train' is writing this run (pid {os.getpid()}" in err
    assert sorted(p.name for p in folder.iterdir()) == ["train.lock"]  # the holder's files only


def test_resume_while_another_writes_exits_2(run):
    before = (run / "checkpoint.pt").read_bytes()
    with locked(run):
        code, _, err = run_cli("train", "--resume", run, "train.steps=9", "--quiet")
    assert code == 2 and f"(pid {os.getpid()}" in err
    assert (run / "checkpoint.pt").read_bytes() == before and not (run / "history.yaml").exists()


def test_resume_refuses_architecture_and_seed_changes_by_name(run):
    config, checkpoint = (run / "config.yaml").read_bytes(), (run / "checkpoint.pt").read_bytes()
    code, out, err = run_cli("train", "--resume", run, "network.hidden=32", "seed=5", "--quiet")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "network.hidden (8 -> 32), seed (0 -> 5) would change what the checkpoint was trained with" in err
    assert (run / "config.yaml").read_bytes() == config and (run / "checkpoint.pt").read_bytes() == checkpoint
    assert not (run / "history.yaml").exists()


def test_resume_with_another_model_is_refused(run):
    code, _, err = run_cli("train", "--resume", run, f"model={run.parent / 'model.py'}:pois", "--quiet")
    assert code == 2 and "model (" in err and "would change what the checkpoint was trained with" in err


def test_resume_records_allowed_overrides_in_the_history_not_the_config(run):
    config = (run / "config.yaml").read_bytes()
    code, out, err = run_cli("train", "--resume", run, "train.steps=8", "train.log_every=1", "--quiet")
    assert code == 0, err
    assert "steps 6->8" in out and load_checkpoint(run)["step"] == 8
    assert (run / "config.yaml").read_bytes() == config  # what the run was started with
    (entry,) = yaml.safe_load((run / "history.yaml").read_text())
    assert entry["step"] == 6 and entry["overrides"] == ["train.steps=8", "train.log_every=1"]
    code, out, _ = run_cli("train", "--resume", run, "train.steps=10", "--quiet")
    assert code == 0 and "steps 8->10" in out
    assert len(yaml.safe_load((run / "history.yaml").read_text())) == 2
    assert load_config(run / "config.yaml").train.steps == 6


def test_disk_full_at_the_start_of_train_names_the_file_and_leaves_no_folder(root, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "atomic_write", disk_full)
    code, out, err = run_cli("train", root / "tiny.yaml", "--quiet", "--root", root)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("amortize: error: ") and "config.yaml: No space left on device" in err
    assert str(root / "checkpoints" / "tiny") in err
    assert not (root / "checkpoints").exists()


def test_disk_full_in_a_given_run_dir_keeps_the_users_files(root, monkeypatch):
    folder = root / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "tb").mkdir()  # theirs, by the name of ours
    monkeypatch.setattr(checkpoint_module, "atomic_write", disk_full)
    code, _, err = run_cli("train", root / "tiny.yaml", "--quiet", "--run-dir", folder)
    assert code == 2 and f"{folder / 'config.yaml'}: No space left on device" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "tb"]


def test_run_that_fails_before_its_first_checkpoint_leaves_no_folder(root):
    code, _, err = run_cli("train", root / "tiny.yaml", "model=model.py:all_infinite", "--quiet", "--root", root)
    assert code == 2 and "most for site 'y' (a non-finite response" in err.splitlines()[-1]
    assert all(line.startswith("amortize: warning: simulations: dropped") for line in err.splitlines()[:-1])
    assert not (root / "checkpoints").exists()


def test_disk_full_when_sample_writes_names_the_file(run, monkeypatch):
    out = run.parent / "new" / "draws.csv"
    monkeypatch.setattr(checkpoint_module, "atomic_write", disk_full)
    code, _, err = run_cli("sample", run, "--data", run.parent / "d.csv", "--num-samples", 20, "--out", out, "--quiet")
    errors = [line for line in err.splitlines() if not line.startswith("amortize: warning:")]  # k of 4 x 20 draws
    assert code == 2 and errors == [f"amortize: error: {out}: No space left on device"]
    assert not (run.parent / "new").exists()
    az = pytest.importorskip("arviz")
    monkeypatch.setattr(az.InferenceData, "to_netcdf", disk_full)
    out = run.parent / "new" / "draws.nc"
    code, _, err = run_cli("sample", run, "--data", run.parent / "d.csv", "--num-samples", 20, "--out", out, "--quiet")
    assert code == 2 and f"{out}: No space left on device" in err
    assert not (run.parent / "new").exists()


def test_sample_refuses_a_response_outside_the_support(root):
    code, _, err = run_cli("train", root / "tiny.yaml", "model=model.py:pois", "--quiet", "--run-dir", root / "p")
    assert code == 0, err
    code, _, err = run_cli("sample", root / "p", "--data", root / "d.csv", "--num-samples", 20, "--quiet")
    assert code == 2 and err.count("\n") == 1
    assert f"{root / 'd.csv'}: response 'y': 5 value(s) outside the support of site 'y' (Poisson: integers >= 0)" in err
    assert err.rstrip().endswith("first at row 1 (1.2), row 2 (0.3), row 3 (0.1), row 4 (0.5), row 6 (2.1)")
    assert Path(root / "p" / "checkpoint.pt").is_file()


def test_two_processes_on_one_run_folder(root):
    """A real second process holds the run folder: this one exits 2 naming that process's pid."""
    folder = root / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli("train", root / "tiny.yaml", "--quiet", "--run-dir", folder)
        assert code == 2 and f"another 'amortize train' is writing this run (pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli("train", root / "tiny.yaml", "--quiet", "--run-dir", folder)  # released: it runs
    assert code == 0, err


ROOT = Path(__file__).resolve().parents[1]  # this checkout's amortize, also in the child process
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
HOLD = """
import sys, time
from pathlib import Path
from amortize.rundir import locked
with locked(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""
