import re
from pathlib import Path

import pytest
import torch

import amortize as am
from amortize.checkpoint import FORMAT_VERSION, atomic_write, load_checkpoint, payload_checksum, save_checkpoint
from amortize.errors import CheckpointError
from amortize.models import gaussian_2level
from amortize.nn import STATISTICS_VERSION

from .conftest import normal_known


@pytest.fixture
def trained(small_sampler):
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    a.fit(steps=5, batch_size=8, progress=False)
    return a


def test_roundtrip_same_draws(trained, small_data, tmp_path):
    path = tmp_path / "ck.pt"
    trained.save(path)
    b = am.Amortizer.load(path, normal_known)
    d1 = trained.posterior(small_data).sample(50, seed=1)
    d2 = b.posterior(small_data).sample(50, seed=1)
    for k in d1:
        assert torch.equal(d1[k], d2[k])
    assert b.step == 5 and b.config.batch_size == 8


def test_wrong_model_is_refused(trained, tmp_path):
    path = tmp_path / "ck.pt"
    trained.save(path)
    with pytest.raises(CheckpointError, match="another model"):
        am.Amortizer.load(path, gaussian_2level)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_is_named(trained, tmp_path, damage):
    path = tmp_path / "ck.pt"
    trained.save(path)
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="ck.pt"):
        am.Amortizer.load(path, normal_known)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        am.Amortizer.load(tmp_path / "nope.pt", normal_known)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    atomic_write(path, lambda fh: fh.write(b"old"))

    def failing(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_encoder_statistics_and_coupling_travel_with_the_checkpoint(small_sampler, tmp_path):
    a = am.Amortizer(normal_known, small_sampler, hidden=8, global_coupling=False)
    a.save(tmp_path / "a.pt")
    assert load_checkpoint(tmp_path / "a.pt")["statistics"] == STATISTICS_VERSION
    b = am.Amortizer.load(tmp_path / "a.pt", normal_known)
    assert not b.global_coupling and b.guide.group_heads["theta"].coupling is None


def _tampered(trained, tmp_path, edit) -> Path:
    """``trained``'s checkpoint with ``edit(payload)`` applied, re-saved with a valid checksum: the
    field, not the checksum, is what is wrong."""
    path = tmp_path / "ck.pt"
    trained.save(path)
    payload = load_checkpoint(path)
    edit(payload)
    save_checkpoint(path, payload)
    return path


@pytest.mark.parametrize("written", ["0.2.3", "0.2.0"])
def test_checkpoint_of_format_1_is_refused_naming_the_file_and_versions(trained, tmp_path, written):
    """A 0.2 checkpoint (format 1) is refused: retrain, or load it with amortize 0.2.x."""
    payload = {**trained.state(), "library_version": written, "format_version": 1}
    payload["checksum"] = payload_checksum(payload)
    torch.save(payload, tmp_path / "old.pt")
    match = (
        rf"old\.pt: written by amortize {written} \(checkpoint format 1\), this is amortize {am.__version__}"
        rf" \(format {FORMAT_VERSION}\); retrain, or load it with amortize 0\.2\.x"
    )
    with pytest.raises(CheckpointError, match=match):
        am.Amortizer.load(tmp_path / "old.pt", normal_known)


def test_checkpoint_of_library_0_2_is_refused_whatever_its_format(trained, tmp_path):
    path = _tampered(trained, tmp_path, lambda p: p.update(library_version="0.2.3"))
    this = re.escape(am.__version__)
    with pytest.raises(CheckpointError, match=rf"ck\.pt: written by amortize 0\.2\.3, this is {this}; retrain"):
        am.Amortizer.load(path, normal_known)


def test_checkpoint_of_library_0_5_is_refused(trained, tmp_path):
    # 0.6 bounds q(globals)'s triangular factor: a 0.5 checkpoint would draw otherwise than it trained
    path = _tampered(trained, tmp_path, lambda p: p.update(library_version="0.5.0"))
    with pytest.raises(CheckpointError, match=r"written by amortize 0\.5\.0, this is 0\.6\.\d+; retrain"):
        am.Amortizer.load(path, normal_known)


def test_checkpoint_of_other_statistics_is_refused(trained, tmp_path):
    path = _tampered(trained, tmp_path, lambda p: p.update(statistics="amortize.moments/0"))
    with pytest.raises(CheckpointError, match=r"ck\.pt: field 'statistics': .*'amortize\.moments/0'.*retrain"):
        am.Amortizer.load(path, normal_known)


def test_checkpoint_without_checksum_is_refused(trained, tmp_path):
    path = tmp_path / "ck.pt"
    trained.save(path)
    payload = torch.load(path, weights_only=True)
    del payload["checksum"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"ck\.pt: field 'checksum' is missing"):
        am.Amortizer.load(path, normal_known)


def _set(key, value):
    return lambda p: p.update({key: value})


def _unknown_option(p):
    p["config"]["no_such_option"] = 1


def _without_obs_range(p):
    del p["ranges"]["obs"]


def _short_rng(p):
    p["rng"]["torch"] = p["rng"]["torch"][:-8]


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set("step", -7), r"field 'step' must be an integer >= 0, found -7"),
        (_set("hidden", "16"), r"field 'hidden' must be an integer >= 1"),
        (_set("pilot_done", 1), r"field 'pilot_done' must be true or false"),
        (_unknown_option, r"field 'config' holds unknown training option\(s\) \['no_such_option'\]"),
        (lambda p: p["config"].update(batch_size=0), r"field 'config': batch_size: must be >= 1"),
        (_without_obs_range, r"field 'ranges' lacks the entry 'obs'"),
        (lambda p: p["ranges"].update(group=[3]), r"field 'ranges\.group' must be \[low, high\]"),
        (_short_rng, r"field 'rng\.torch' must be a uint8 RNG state of \d+ bytes"),
        (lambda p: p["rng"].update(generator=torch.zeros(3)), r"field 'rng\.generator'"),
        (lambda p: p["optimizer"]["param_groups"][0].update(params=[0]), r"field 'optimizer'"),
        (_set("history", None), r"field 'history' must be a list"),
        (_set("signature", ["mu"]), r"field 'signature' and 'fingerprint' must be"),
    ],
    ids=[
        "step",
        "hidden",
        "pilot_done",
        "config_key",
        "config_value",
        "ranges",
        "range_pair",
        "rng",
        "generator",
        "optimizer",
        "history",
        "signature",
    ],
)
def test_checkpoint_with_an_invalid_field_is_refused_naming_file_and_field(trained, tmp_path, edit, match):
    path = _tampered(trained, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"ck\.pt: " + match):
        am.Amortizer.load(path, normal_known)
