"""The accuracy guard: judge a round (keep, retry or stop), keep a snapshot before it, roll it back.

:class:`Guard` holds the settings; :class:`GuardController` is the one place that takes the dense
baseline, judges a retrained round against it, keeps a CPU snapshot of the model (and of the
pruning state the driver gives it) before each round, and rolls back to it. The callback uses it
inside one fit and :func:`lightning_prune.fit_rounds` uses it, through the callback, across fits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from torch import nn

from lightning_prune.core.schedule import Schedule
from lightning_prune.core.validation import check_bool, check_choice, check_int, check_number

__all__ = ["Guard", "GuardController", "Verdict"]

GUARD_MODES: tuple[str, ...] = ("max", "min")
GUARD_ACTIONS: tuple[str, ...] = ("stop", "retry")


@dataclass(frozen=True)
class Guard:
    """How much a monitored metric may worsen from the dense baseline before a round is rolled back.

    Attributes:
        monitor: Key of the metric in ``trainer.callback_metrics`` (e.g. ``"val_acc"``).
        mode: ``"max"`` if higher is better (accuracy), ``"min"`` if lower is (loss, error).
        tolerance: Largest allowed worsening, ``>= 0`` (absolute, or a share of the baseline).
        relative: Whether ``tolerance`` is a share of the baseline.
        action: ``"stop"`` the schedule after a rollback, or ``"retry"`` the round gentler.
        retries: Retries of one round before stopping (with ``"retry"``).
        retry_scale: Factor in ``(0, 1)`` on the round's level at each retry.

    Example::

        >>> Guard("val_acc", tolerance=0.002).worse_by({"val_acc": 0.980}, baseline=0.985)
        'val_acc 0.98 is worse than the dense 0.985 by 0.005, more than the tolerance 0.002'
    """

    monitor: str
    mode: Literal["max", "min"] = "max"
    tolerance: float = 0.0
    relative: bool = False
    action: Literal["stop", "retry"] = "stop"
    retries: int = 1
    retry_scale: float = 0.8

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"`guard.monitor` must be a metric name, got {self.monitor!r}.")
        check_choice(self.mode, "guard.mode", GUARD_MODES)
        check_choice(self.action, "guard.action", GUARD_ACTIONS)
        check_number(self.tolerance, "guard.tolerance")
        check_bool(self.relative, "guard.relative")
        check_int(self.retries, "guard.retries")
        scale = check_number(self.retry_scale, "guard.retry_scale", positive=True)
        if not scale < 1:
            raise ValueError(f"`guard.retry_scale` must be a number in (0, 1), got {self.retry_scale!r}.")

    def value(self, metrics: Mapping[str, Any]) -> float:
        """The monitored value in ``metrics``.

        Raises:
            ValueError: If the metric is not there, naming the keys that are.
        """
        if self.monitor not in metrics:
            logged = sorted(k for k in metrics if not k.startswith("prune/"))
            raise ValueError(
                f"`guard.monitor` {self.monitor!r} is not among the logged metrics {logged}. Log it (e.g. "
                f"self.log({self.monitor!r}, ...) in validation_step) or pick one of those."
            )
        return float(metrics[self.monitor])

    def worse_by(self, metrics: Mapping[str, Any], baseline: float) -> str | None:
        """``None`` if the monitored value is within tolerance of ``baseline``, else why it is not."""
        value = self.value(metrics)
        worse = baseline - value if self.mode == "max" else value - baseline
        allowed = self.tolerance * abs(baseline) if self.relative else self.tolerance
        if worse <= allowed or math.isclose(worse, allowed, rel_tol=1e-9, abs_tol=1e-12):
            return None
        return (
            f"{self.monitor} {value:.4g} is worse than the dense {baseline:.4g} by {worse:.4g}, "
            f"more than the tolerance {allowed:.4g}"
        )


class Verdict(NamedTuple):
    """The guard's judgement of a round.

    Attributes:
        action: ``"keep"`` it, ``"retry"`` it gentler after the rollback, or ``"stop"`` the schedule.
        reason: Why, in words.
    """

    action: Literal["keep", "retry", "stop"]
    reason: str


class GuardController:
    """The dense baseline, the judgement of rounds, and the snapshot a failed round rolls back to.

    Example::

        >>> controller = GuardController(Guard("val_acc", tolerance=0.01, action="retry"))
        >>> controller.set_baseline({"val_acc": 0.99})
        >>> controller.judge({"val_acc": 0.95}, tries=0, can_retry=True).action
        'retry'
    """

    def __init__(self, settings: Guard):
        self.settings = settings
        self.baseline: float | None = None
        self.snapshot: dict[str, Any] | None = None

    def set_baseline(self, metrics: Mapping[str, Any]) -> None:
        """Take the monitored value of ``metrics`` as the dense baseline."""
        self.baseline = self.settings.value(metrics)

    def judge(self, metrics: Mapping[str, Any], *, tries: int, can_retry: bool) -> Verdict:
        """Keep the round, retry it (``action="retry"``, fewer than ``retries`` tries, and ``can_retry``), or stop.

        Raises:
            RuntimeError: If there is no baseline yet.
        """
        if self.baseline is None:
            raise RuntimeError("The accuracy guard has no dense baseline yet.")
        reason = self.settings.worse_by(metrics, self.baseline)
        if reason is None:
            return Verdict("keep", f"{self.settings.monitor} within tolerance")
        if self.settings.action == "retry" and tries < self.settings.retries and can_retry:
            return Verdict("retry", reason)
        return Verdict("stop", reason)

    def decide(
        self, schedule: Schedule, k: int, metrics: Mapping[str, Any], *, can_retry: bool, in_place_of: int | None
    ) -> tuple[Verdict, str]:
        """Judge retrained round ``k`` and carry the verdict out on ``schedule``: a retry or a stop, recorded.

        Args:
            schedule: The run's schedule.
            k: The round.
            metrics: The metrics after its retraining.
            can_retry: Whether a retry has epochs to run in.
            in_place_of: Within one fit: the round whose epochs a retry takes (it is dropped).

        Returns:
            The verdict and the decision as a sentence. The caller rolls back unless the verdict is "keep".
        """
        verdict = self.judge(metrics, tries=schedule.tries(k), can_retry=can_retry)
        if verdict.action == "retry":
            schedule.retry(k, self.settings.retry_scale, in_place_of)
            where = "" if in_place_of is None else f" in the epochs of round {in_place_of + 1}"
            reason = f"{verdict.reason}; retrying it gentler{where}"
        elif verdict.action == "stop":
            schedule.stop()
            reason = f"{verdict.reason}; {'the schedule stops' if can_retry else 'no epochs left to retry'}"
        else:
            reason = verdict.reason
        decision = "kept" if verdict.action == "keep" else "rolled back"
        schedule.record(decision, k, reason)
        return verdict, f"round {k + 1} {decision}: {reason}"

    def take_snapshot(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Keep CPU copies of ``model``'s weights and buffers, and ``state`` (the driver's pruning state)."""
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.snapshot = {"model": weights, "state": dict(state)}

    def roll_back(self, model: nn.Module) -> dict[str, Any]:
        """Load the snapshot's weights into ``model``; returns the pruning state kept with them.

        Raises:
            RuntimeError: If there is no snapshot.
        """
        if self.snapshot is None:
            raise RuntimeError("The accuracy guard has no snapshot to roll back to.")
        model.load_state_dict(self.snapshot["model"])
        return copy.deepcopy(dict(self.snapshot["state"]))

    def state_dict(self) -> dict[str, Any]:
        """The baseline and the snapshot (CPU tensors and plain values)."""
        return {"baseline": self.baseline, "snapshot": self.snapshot}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.baseline = None if state.get("baseline") is None else float(state["baseline"])
        self.snapshot = state.get("snapshot")
