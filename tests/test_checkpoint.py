import pytest
import torch

import amortize as am
from amortize.checkpoint import atomic_write, save_checkpoint
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
    assert a.guide.encoder.revision == 10  # new amortizers compute the latest statistics
    a.guide.encoder.revision = 0  # as a checkpoint trained on the first statistics
    a.save(tmp_path / "a.pt")
    b = am.Amortizer.load(tmp_path / "a.pt", normal_known)
    assert b.guide.encoder.revision == 0 and not b.guide.encoder.pooled_df and b.global_coupling
    assert b.guide.group_heads["theta"].coupling is not None
    state = a.state()
    del state["statistics_revision"]
    for flags, revision in [((False, False), 0), ((True, False), 1), ((True, True), 2)]:
        state["pooled_df"], state["residual_pooling"] = flags  # as 0.2.1 recorded them
        save_checkpoint(tmp_path / "old.pt", state)
        assert am.Amortizer.load(tmp_path / "old.pt", normal_known).guide.encoder.revision == revision


def test_checkpoint_without_count_terms_loads_as_the_fixed_map(trained, small_data, tmp_path):
    """A checkpoint saved before the global head's count terms loads with them at zero, which is the
    earlier fixed standardizing map: same draws as the same weights with the terms zeroed."""
    state = trained.state()
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "count" not in k and "slope" not in k}
    save_checkpoint(tmp_path / "old.pt", state)
    old = am.Amortizer.load(tmp_path / "old.pt", normal_known)
    head = old.guide.global_head
    assert float(head.count_unit.weight.abs().sum() + head.raw_per_count.weight.abs().sum()) == 0.0
    trained.save(tmp_path / "new.pt")
    new = am.Amortizer.load(tmp_path / "new.pt", normal_known)
    with torch.no_grad():
        for name in ("count_unit", "raw_per_count"):
            getattr(new.guide.global_head, name).weight.zero_()
            getattr(new.guide.global_head, name).bias.zero_()
    a = old.posterior(small_data).sample(50, seed=2)
    b = new.posterior(small_data).sample(50, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _loads_as_saved(a: am.Amortizer, model, revision: int, narrower: dict[str, int], tmp_path) -> None:
    """Save ``a`` as a checkpoint of an earlier ``revision`` would hold it: the weights ``narrower``
    names lack their last columns (statistics appended since; zeroed here first, as the earlier
    layout had no weights on them). Loaded, it has that revision and draws as ``a`` does."""
    a.guide.encoder.revision = revision
    params = dict(a.guide.named_parameters())
    with torch.no_grad():
        for key, n in narrower.items():
            params[key][:, -n:] = 0
    state = a.state()
    for key, n in narrower.items():
        state["state_dict"][key] = state["state_dict"][key][:, :-n]
    save_checkpoint(tmp_path / "old.pt", state)
    b = am.Amortizer.load(tmp_path / "old.pt", model)
    assert b.guide.encoder.revision == revision
    data = a.simulate_batch(torch.Generator().manual_seed(0), 1).data
    data = data.with_response(data.y[0])
    x, y = a.posterior(data).sample(20, seed=1), b.posterior(data).sample(20, seed=1)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_checkpoint_of_revision_3_loads_with_zero_weights_on_the_appended_statistics(tmp_path):
    """Revision 4 appends the slopes' spreads to the dataset statistics: a revision-3 checkpoint has
    narrower skip-path weights, loaded with zero columns for them, and draws as it did."""
    from amortize.models import SAMPLERS, varying_slopes

    a = am.Amortizer(varying_slopes, SAMPLERS["varying_slopes"](), hidden=8)
    a.fit(steps=2, batch_size=8, progress=False)
    c = a.guide.encoder.count_dim
    narrower = {"global_head.raw_slope.weight": 2, "global_head.raw_per_count.weight": 2 * c}
    _loads_as_saved(a, varying_slopes, 3, narrower, tmp_path)


def test_checkpoint_of_revision_5_loads_with_zero_weights_on_the_pooled_slope_intercept(tmp_path):
    """Revision 6 appends each group's intercept at the pooled slopes (and its log n) to the group
    statistics: a revision-5 checkpoint's group heads have one column fewer on each, loaded at zero,
    and it draws as it did."""
    from amortize.models import SAMPLERS, varying_slopes

    a = am.Amortizer(varying_slopes, SAMPLERS["varying_slopes"](), hidden=8)
    a.fit(steps=2, batch_size=8, progress=False)
    assert a.guide.group_heads["b"].raw_slope.weight.shape[1] == 3  # slope, own and pooled-slope intercepts
    narrower = {"group_heads.b.raw_slope.weight": 1, "group_heads.b.raw_slope_scale.weight": 1}
    _loads_as_saved(a, varying_slopes, 5, narrower, tmp_path)


def test_checkpoint_of_revision_6_loads_with_zero_weights_on_the_shrunk_between_slopes(tmp_path):
    """Revisions 7 and 10 append each between-group slope shrunk by its precision (two per slope) and
    the intercepts at covariates 0 to the dataset's slopes: a revision-6 checkpoint of a model with
    group covariates has narrower global skip paths, loaded with zero columns, and draws as it did."""
    from amortize.models import SAMPLERS, gaussian_contextual

    a = am.Amortizer(gaussian_contextual, SAMPLERS["gaussian_contextual"](), hidden=8)
    a.fit(steps=2, batch_size=8, progress=False)
    c, extra = a.guide.encoder.count_dim, 6  # two county covariates x (c = 1, c = 4), two intercepts
    narrower = {"global_head.raw_slope.weight": extra, "global_head.raw_per_count.weight": extra * c}
    _loads_as_saved(a, gaussian_contextual, 6, narrower, tmp_path)


def test_training_resumes_from_a_checkpoint_of_an_earlier_layout(tmp_path):
    """A checkpoint whose skip-path weights are narrower (statistics appended since) resumes training:
    its Adam moments are zero-padded like its weights, the saved columns kept."""
    from amortize.models import SAMPLERS, gaussian_contextual

    a = am.Amortizer(gaussian_contextual, SAMPLERS["gaussian_contextual"](), hidden=8)
    a.fit(steps=4, stop_at=2, batch_size=8, progress=False)
    state = a.state()
    key, extra = "global_head.raw_slope.weight", 4
    sd = state["state_dict"]
    sd[key] = sd[key][:, :-extra]
    index = [k for k in sd if k not in dict(a.guide.named_buffers())].index(key)
    moments = state["optimizer"]["state"][index]
    saved = moments["exp_avg"][:, :-extra].clone()
    for m in ("exp_avg", "exp_avg_sq"):
        moments[m] = moments[m][:, :-extra]
    save_checkpoint(tmp_path / "old.pt", state)
    b = am.Amortizer.load(tmp_path / "old.pt", gaussian_contextual, SAMPLERS["gaussian_contextual"]())
    new_index = [n for n, _ in b.guide.named_parameters()].index(key)
    restored = b._optimizer_state["state"][new_index]["exp_avg"]
    assert restored.shape[1] == saved.shape[1] + extra
    assert torch.equal(restored[:, :-extra], saved) and float(restored[:, -extra:].abs().sum()) == 0.0
    b.fit(steps=4, batch_size=8, progress=False)  # resumes: no shape error in Adam
    assert b.step == 4
