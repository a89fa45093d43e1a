"""Fault injection: training faults, Ctrl-C, killed and failing checkpoint writes, damaged or foreign
checkpoints, and bit-exact resume. For each fault: the error is named, nothing half-written is left,
and earlier results (the last checkpoint) are intact."""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am
from amortize.checkpoint import load_checkpoint, save_checkpoint
from amortize.errors import AmortizeError, CheckpointError, TrainingError
from amortize.models import gaussian_2level
from amortize.train import _deferred_interrupt

from .conftest import normal_known

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(batch_size=4, warmup=2, pilot_structures=2, log_every=2, progress=False)  # a step takes ~0.1 s


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine, two threads make these tiny steps ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def weights(a: am.Amortizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in a.guide.state_dict().items()}


def assert_same_weights(w1: dict[str, torch.Tensor], w2: dict[str, torch.Tensor]) -> None:
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


def leftovers(folder: Path, keep: str = "ck.pt") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


@pytest.fixture
def saved(small_sampler, tmp_path):
    """An amortizer trained 4 steps and its checkpoint: the 'prior result' every fault must keep."""
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    a.fit(steps=4, **FAST)
    path = tmp_path / "ck.pt"
    a.save(path)
    return a, path


def inject(monkeypatch, fault):
    """Wrap the training loss (of each piece of a step's batch: one piece for these small batches):
    ``fault(call_index, loss)`` returns the loss to use."""
    from amortize import sources

    real, calls = sources.batch_loss, []

    def loss(amortizer, cfg, sim):
        calls.append(None)
        return fault(len(calls) - 1, real(amortizer, cfg, sim))

    monkeypatch.setattr(sources, "batch_loss", loss)


# ---------------------------------------------------------------------------------------------- exact resume
def test_resume_is_bit_exact(small_sampler, tmp_path):
    """N steps, save, load, N more steps == 2N uninterrupted steps (weights and optimizer, on CPU)."""
    whole = am.Amortizer(normal_known, small_sampler, hidden=16, seed=3)
    whole.fit(steps=40, **FAST)
    first = am.Amortizer(normal_known, small_sampler, hidden=16, seed=3)
    first.fit(steps=40, stop_at=20, **FAST)
    assert first.step == 20
    first.save(tmp_path / "ck.pt")
    torch.randn(100)  # the caller's own use of the RNG between runs must not matter
    resumed = am.Amortizer.load(tmp_path / "ck.pt", normal_known, sampler=small_sampler)
    resumed.fit(steps=40, **FAST)
    assert resumed.step == whole.step == 40
    assert_same_weights(weights(whole), weights(resumed))
    s1, s2 = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in s1:
        for k in s1[i]:
            assert torch.equal(s1[i][k], s2[i][k])


def test_same_seed_same_run(small_sampler):
    torch.manual_seed(1)
    a = am.Amortizer(normal_known, small_sampler, hidden=16, seed=5)
    torch.manual_seed(2)
    b = am.Amortizer(normal_known, small_sampler, hidden=16, seed=5)
    assert_same_weights(weights(a), weights(b))  # initial weights follow the seed, not the caller's RNG


# ---------------------------------------------------------------------------------------------- fault: NaN loss
def test_nan_loss_and_nan_gradient_steps_are_skipped_and_logged(small_sampler, monkeypatch, caplog):
    def fault(i, loss):
        if i in (2, 3):
            return loss * float("nan")  # non-finite loss
        if i == 5:
            return loss + torch.sqrt(loss * 0.0)  # finite loss (0 added), infinite * 0 = NaN gradient
        return loss

    inject(monkeypatch, fault)
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    with caplog.at_level(logging.WARNING, logger="amortize.train"):
        a.fit(steps=8, max_bad_steps=3, **FAST)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 3, skipped
    assert "non-finite loss" in skipped[0] and "non-finite gradient" in skipped[2]
    assert a.step == 8
    assert all(bool(torch.isfinite(v).all()) for v in a.guide.state_dict().values())


def test_repeated_nan_stops_with_message_and_keeps_last_checkpoint(small_sampler, tmp_path, monkeypatch):
    inject(monkeypatch, lambda i, loss: loss * float("nan") if i >= 3 else loss)
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    path = tmp_path / "ck.pt"
    with pytest.raises(TrainingError, match=r"step 5: 3 consecutive non-finite.*ck.pt was not overwritten"):
        a.fit(steps=20, max_bad_steps=3, checkpoint_every=2, checkpoint_path=str(path), **FAST)
    kept = am.Amortizer.load(path, normal_known)  # the checkpoint of step 2, the last one before the faults
    assert kept.step == 2 and leftovers(tmp_path) == []
    assert all(bool(torch.isfinite(v).all()) for v in kept.guide.state_dict().values())


# ---------------------------------------------------------------------------------------------- fault: Ctrl-C
def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(small_sampler, tmp_path, monkeypatch):
    whole = am.Amortizer(normal_known, small_sampler, hidden=16)
    whole.fit(steps=8, **FAST)
    inject(monkeypatch, lambda i, loss: (os.kill(os.getpid(), signal.SIGINT), loss)[1] if i == 5 else loss)
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        a.fit(steps=8, checkpoint_path=str(tmp_path / "ck.pt"), **FAST)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert a.step == 6 and leftovers(tmp_path) == []  # the interrupted step (index 5) was completed, then saved
    monkeypatch.undo()
    resumed = am.Amortizer.load(tmp_path / "ck.pt", normal_known, sampler=small_sampler)
    assert resumed.step == 6
    resumed.fit(steps=8, **FAST)
    assert_same_weights(weights(whole), weights(resumed))


def test_second_ctrl_c_interrupts_at_once():
    with pytest.raises(KeyboardInterrupt):
        with _deferred_interrupt() as flags:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert flags["stop"]  # the first one only asks to stop after the step
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            pytest.fail("the second Ctrl-C did not interrupt")


# ---------------------------------------------------------------------------------------------- fault: killed mid-write
KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, {root!r})
import amortize as am
from tests.conftest import normal_known

def stall(fd):  # the checkpoint's bytes are in the temporary file; the rename has not happened
    print("writing", flush=True)
    time.sleep(60)

a = am.Amortizer(normal_known, am.StructureSampler(["group"], groups={{"group": (3, 8)}}, obs=(2, 6)), hidden=16)
os.fsync = stall
a.save({path!r})
"""


def test_process_killed_mid_write_leaves_previous_checkpoint(saved, tmp_path):
    a, path = saved
    before = path.read_bytes()
    script = textwrap.dedent(KILLED_WRITER.format(root=str(ROOT), path=str(path)))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "writing", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert path.read_bytes() == before
    stray = [p for p in tmp_path.iterdir() if p.name.startswith(f".ck.pt.{proc.pid}.")]
    assert len(stray) == 1 and stray[0].stat().st_size > 0  # half a file, under a hidden temporary name
    loaded = am.Amortizer.load(path, normal_known)  # readers never look at the stray file
    assert loaded.step == 4
    assert_same_weights(weights(a), weights(loaded))
    a.save(path)  # the next save succeeds and removes what the dead writer left
    assert leftovers(tmp_path) == []


def test_temporaries_of_live_writers_are_left_alone(saved, tmp_path):
    a, path = saved
    live = tmp_path / f".ck.pt.{os.getppid()}.abc.tmp"  # a process that exists: perhaps writing now
    live.write_bytes(b"partial")
    a.save(path)
    assert live.exists()
    assert am.Amortizer.load(path, normal_known).step == 4


# ---------------------------------------------------------------------------------------------- fault: disk full
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_is_named_and_keeps_previous_checkpoint(saved, tmp_path, monkeypatch, where):
    a, path = saved
    before = path.read_bytes()
    a.fit(steps=6, **FAST)  # new weights that will not reach the disk
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(full))
    else:
        real_fdopen = os.fdopen

        class HalfWriter:  # writes half of what it is given, then the disk is full
            def __init__(self, fh):
                self.fh = fh

            def write(self, data):
                self.fh.write(bytes(data)[: len(data) // 2])
                raise full

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(CheckpointError, match=r"ck.pt: writing the checkpoint failed \(No space left on device\)"):
        a.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    assert am.Amortizer.load(path, normal_known).step == 4


def test_disk_full_during_training_stops_with_previous_checkpoint(small_sampler, tmp_path, monkeypatch):
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    path = tmp_path / "ck.pt"
    a.fit(steps=6, stop_at=2, checkpoint_path=str(path), **FAST)
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(CheckpointError, match="previous checkpoint is intact"):
        a.fit(steps=6, checkpoint_every=2, checkpoint_path=str(path), **FAST)
    monkeypatch.undo()
    assert path.read_bytes() == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- fault: corrupted file
def test_corrupted_checkpoint_is_named_never_silent(saved, tmp_path):
    """Flipped bits anywhere: a CheckpointError, or (padding of the zip container) exactly the saved weights."""
    a, path = saved
    raw = path.read_bytes()
    rng = random.Random(0)
    damaged = tmp_path / "damaged.pt"
    errors = 0
    for _ in range(25):
        b = bytearray(raw)
        pos = rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
        damaged.write_bytes(bytes(b))
        try:
            loaded = am.Amortizer.load(damaged, normal_known)
        except CheckpointError as e:
            assert "damaged.pt" in str(e)
            errors += 1
        else:
            assert_same_weights(weights(a), weights(loaded))
    assert errors >= 10
    for cut in (0, 10, len(raw) // 3, len(raw) - 5):  # truncated: killed without atomic write, disk error
        damaged.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            am.Amortizer.load(damaged, normal_known)
    assert path.read_bytes() == raw


def test_weight_flip_is_caught_by_the_checksum(saved, tmp_path):
    a, path = saved
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name].view(-1)[0] += 1e-3  # what a flipped bit in a tensor does: loads fine
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        am.Amortizer.load(path, normal_known)


def test_checkpoint_that_cannot_be_loaded_safely_is_never_written(saved, tmp_path):
    a, path = saved
    before = path.read_bytes()
    a.config.extra = {"callback": Path("/not/a/tensor")}  # not loadable with weights_only=True
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        a.save(path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- fault: wrong model
def positive_theta(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.LogNormal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], 0.5), obs=data.y)


def vector_mu(data):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu[..., 0], 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], 0.5), obs=data.y)


def other_level(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("school", data.size("school")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("school")], 0.5), obs=data.y)


@pytest.mark.parametrize(
    "model, match",
    [
        (gaussian_2level, "another model"),  # other sites
        (positive_theta, r"another model \(latents: .*theta.*Real.*this model .*GreaterThan"),  # other support
        (vector_mu, r"another model \(latents: .*'mu', None, \[\].*this model .*'mu', None, \[2\]"),  # other shape
        (other_level, "does not run on the checkpoint's data structure"),  # other level
    ],
)
def test_wrong_model_checkpoint_is_refused(saved, model, match):
    a, path = saved
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=match):
        am.Amortizer.load(path, model)
    assert path.read_bytes() == before


def test_sampler_with_other_covariates_is_refused(saved):
    _, path = saved
    sampler = am.StructureSampler(["group"], groups={"group": (3, 8)}, obs=(2, 6), covariates={"obs": {"x": {}}})
    with pytest.raises(CheckpointError, match="sampler's datasets.*differ"):
        am.Amortizer.load(path, normal_known, sampler=sampler)


def _refused(version: str) -> str:
    """The refusal of a checkpoint written by an older minor version, as a pattern."""
    old, this, minor = (re.escape(v) for v in (version, am.__version__, version.rsplit(".", 1)[0]))
    return rf"written by amortize {old}, this is {this}; retrain, or load it with amortize {minor}\.x"


@pytest.mark.parametrize(
    "edit, match",
    [
        *(({"library_version": v}, _refused(v)) for v in ("0.2.3", "0.3.0", "0.4.0", "0.5.0")),
        ({"library_version": "1.1.0"}, "written by amortize 1.1.0"),
        ({"library_version": None}, "no library version"),
        ({"state_dict": None}, "lacks \\['state_dict'\\]"),
        ({"format_version": 99}, "not an amortize checkpoint of format 2 \\(found 99\\)"),
    ],
)
def test_other_version_or_format_is_refused(saved, edit, match):
    _, path = saved
    payload = load_checkpoint(path)
    for k, v in edit.items():
        if v is None:
            del payload[k]
        else:
            payload[k] = v
    if "format_version" in edit:
        torch.save(payload, path)
    else:
        save_checkpoint(path, payload)  # a valid checksum: only the version (or key) is wrong
    with pytest.raises(CheckpointError, match=match):
        am.Amortizer.load(path, normal_known)


def test_loaded_without_sampler_cannot_train(saved):
    _, path = saved
    b = am.Amortizer.load(path, normal_known)
    with pytest.raises(AmortizeError, match="without its training sampler"):
        b.fit(steps=6, **FAST)


def test_training_ranges_survive_a_load_and_save_without_sampler(saved, tmp_path):
    a, path = saved
    am.Amortizer.load(path, normal_known).save(tmp_path / "again.pt")
    again = am.Amortizer.load(tmp_path / "again.pt", normal_known).ranges
    assert again == a.ranges and (again["group"], again["obs"]) == ([3, 8], [2, 6])
