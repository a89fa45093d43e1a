"""The held-out loss during training and early stopping (amortize/heldout_loss.py)."""

from __future__ import annotations

import torch

import amortize as am

from .conftest import normal_known


def _fit(**kw):
    sampler = am.StructureSampler(["group"], groups={"group": (3, 6)}, obs=(2, 5))
    a = am.Amortizer(normal_known, sampler, hidden=8, seed=4)
    a.fit(steps=12, batch_size=8, pilot_structures=2, progress=False, **kw)
    return a


def test_held_out_checks_leave_training_unchanged_and_repeat_their_batch(tmp_path):
    """The same weights with and without the checks (their RNG is their own); a check of unchanged
    weights gives the same value again (the same held-out batch); TensorBoard gets train/val_loss."""
    plain = _fit()
    checked = _fit(val_every=3, log_dir=str(tmp_path / "tb"))
    for p, q in zip(plain.guide.parameters(), checked.guide.parameters()):
        assert torch.equal(p, q)
    assert [h["step"] for h in checked.held_out.history] == [3, 6, 9, 12]
    last = checked.held_out.history[-1]["val_loss"]
    assert checked.held_out.loss() == last
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (tmp_path / "tb").glob("events.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/val_loss")] == [3, 6, 9, 12]


def test_early_stop_after_patience_checks_without_a_lower_loss(monkeypatch):
    """Held-out losses 5, 4, 4.5, 4.2, 3, ...: with early_stop=2 training ends at the 4th check (step 8,
    two checks above the best 4); with early_stop=3 the 5th check improves and training runs on."""
    from amortize.heldout_loss import HeldOutLoss

    for patience, end in ((2, 8), (3, 12)):
        values = iter([5.0, 4.0, 4.5, 4.2, 3.0, 2.0])
        monkeypatch.setattr(HeldOutLoss, "loss", lambda self, v=values: next(v))
        a = _fit(val_every=2, early_stop=patience)
        assert a.step == end and a.held_out.history[-1]["step"] == end, patience
    calls = []
    a = _fit(val_every=0, callback=lambda step, loss: calls.append(step) or step == 4)  # a callback may stop too
    assert a.step == 5 and calls == [0, 1, 2, 3, 4]
