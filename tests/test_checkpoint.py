import pytest
import torch

import amortize as am
from amortize.checkpoint import atomic_write
from amortize.errors import CheckpointError
from amortize.models import gaussian_2level

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
    a = am.Amortizer(normal_known, small_sampler, hidden=8, global_coupling=True)
    assert a.guide.encoder.pooled_df  # new amortizers use the unbiased pooled variance
    a.guide.encoder.pooled_df = False  # as a checkpoint trained on the older statistics
    a.guide.encoder.residual_pooling = False
    a.save(tmp_path / "a.pt")
    b = am.Amortizer.load(tmp_path / "a.pt", normal_known)
    assert b.guide.encoder.pooled_df is False and b.guide.encoder.residual_pooling is False and b.global_coupling
    assert b.guide.group_heads["theta"].coupling is not None
