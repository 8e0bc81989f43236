"""Checkpoints inside an epoch: an epoch interrupted after a mid-epoch checkpoint resumes at the saved batch and
ends with the same weights as an uninterrupted one (``training.engine.Within``, ``training.loop.fit``)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from training.engine import Deadline, EpochProgress, EpochStats, Runtime, Within, train_one_epoch
from training.loop import FitState, Phase, Validation, fit, fit_state_from, state_fields

RT = Runtime(device=torch.device("cpu"), progress=False)


class Interrupted(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def _problem() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer, torch.randn(200, 8), torch.randint(0, 3, (200,))


def _epoch(model: nn.Module, optimizer: torch.optim.Optimizer, within: Within | None) -> EpochStats:
    _, _, x, y = _problem()
    return train_one_epoch(
        model, optimizer, lambda idx: (x[idx], y[idx]), torch.arange(200), RT,
        batch_size=4, seed=3, epoch=1, within=within,
    )  # fmt: skip


def test_an_interrupted_epoch_resumes_at_its_checkpoint_with_the_same_weights() -> None:
    reference_model, reference_opt, _, _ = _problem()
    reference = _epoch(reference_model, reference_opt, None)

    model, optimizer, _, _ = _problem()
    saved: dict[str, object] = {}

    def save(progress: EpochProgress) -> None:  # what a state file would hold at that moment
        saved.update(progress=progress, model=copy.deepcopy(model.state_dict()),
                     optimizer=copy.deepcopy(optimizer.state_dict()))  # fmt: skip
        raise Interrupted

    with pytest.raises(Interrupted):
        _epoch(model, optimizer, Within(save=save, every=0.0, last=time.monotonic() - 1))
    progress = saved["progress"]
    assert isinstance(progress, EpochProgress)
    assert progress.batches == 20 and progress.seen == 80  # the first check after 20 of the 50 batches

    resumed_model, resumed_opt, _, _ = _problem()
    resumed_model.load_state_dict(saved["model"])  # type: ignore[arg-type]
    resumed_opt.load_state_dict(saved["optimizer"])  # type: ignore[arg-type]
    stats = _epoch(resumed_model, resumed_opt, Within(start=EpochProgress.from_dict(progress.to_dict())))
    for name, value in reference_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value)
    assert stats.images == reference.images == 200
    assert stats.loss == pytest.approx(reference.loss, rel=1e-9)
    assert stats.accuracy == pytest.approx(reference.accuracy)


def test_fit_saves_the_partial_epoch_and_a_resumed_fit_continues_it() -> None:
    calls: list[EpochProgress | None] = []
    saved: list[dict[str, object]] = []

    def train_epoch(epoch: int, deadline: object, within: Within) -> EpochStats:
        calls.append(within.start)
        if within.start is None and epoch == 1:  # the second epoch is interrupted after a checkpoint
            assert within.save is not None
            within.save(EpochProgress(batches=7, loss_sum=3.5, seen=28, seconds=2.0))
            raise Interrupted
        return EpochStats(loss=0.5, images=40, seconds=1.0)

    def validate() -> Validation:
        return Validation(1.0 / (len(calls) + 1))

    def save(state: FitState) -> None:
        saved.append(state_fields(state, "best", "best_weights"))

    phase = Phase("pretrain", epochs=3, checkpoint_seconds=0.0)
    with pytest.raises(Interrupted):
        fit(phase, RT, train_epoch, validate, lambda: {"w": 1}, save)
    last = saved[-1]
    assert last["epoch"] == 1 and last["partial"] == EpochProgress(7, 3.5, 0, 28, 2.0).to_dict()

    resumed = fit(
        phase, RT, train_epoch, validate, lambda: {"w": 2}, save, resume=fit_state_from(last, "best", "best_weights")
    )
    assert calls[-2] == EpochProgress(7, 3.5, 0, 28, 2.0)  # epoch 2 resumed at batch 7
    assert calls[-1] is None  # epoch 3 starts from its first batch
    assert resumed.state.epoch == 3 and resumed.state.partial is None and resumed.complete
    assert saved[-1]["partial"] is None


def test_a_signal_stops_an_epoch_without_a_budget_at_the_next_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM sets ``Deadline.stop_requested``; a run without ``--budget-seconds`` has no deadline, and its epoch
    must still stop at the next check (every 20 batches) instead of running to its end."""
    monkeypatch.setattr(Deadline, "stop_requested", True)
    model, optimizer, _, _ = _problem()
    stats = _epoch(model, optimizer, None)
    assert stats.stopped_early and stats.images == 80  # 20 of the 50 batches of 4
    monkeypatch.setattr(Deadline, "stop_requested", False)
    assert not _epoch(*_problem()[:2], None).stopped_early
