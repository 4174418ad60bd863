"""Accuracy guard for iterative pruning: is a round's result within tolerance of the dense baseline?

Pure Python: the driver (the callback or :func:`lightning_prune.fit_rounds`) reads the monitored
metric after a round's retraining, asks :meth:`AccuracyGuard.verdict`, and rolls the round back when
it fails, then stops the schedule or retries the round gentler (:func:`gentler`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning_prune.core.schedule import Round

GUARD_MODES: tuple[str, ...] = ("max", "min")
GUARD_ACTIONS: tuple[str, ...] = ("stop", "retry")


@dataclass
class AccuracyGuard:
    """How much a monitored metric may worsen from the dense baseline before a round is rolled back.

    Attributes:
        monitor: Key of the metric in ``trainer.callback_metrics`` (e.g. ``"val_acc"``).
        mode: ``"max"`` if higher is better (accuracy), ``"min"`` if lower is (loss, error).
        tolerance: Largest allowed worsening, ``>= 0`` (absolute, or a share of the baseline).
        relative: Whether ``tolerance`` is a share of the baseline.
        action: ``"stop"`` the schedule after a rollback, or ``"retry"`` the round gentler.
        retries: Retries of one round before stopping (with ``"retry"``).
        retry_scale: Factor on the round's quality (or amount) at each retry, in ``(0, 1)``.
        baseline: The dense value, set at the first prune.

    Example::

        >>> guard = AccuracyGuard("val_acc", tolerance=0.002, baseline=0.985)
        >>> guard.verdict({"val_acc": 0.984}) is None
        True
        >>> guard.verdict({"val_acc": 0.980})
        'val_acc 0.98 is worse than the dense 0.985 by 0.005, more than the tolerance 0.002'
    """

    monitor: str
    mode: str = "max"
    tolerance: float = 0.0
    relative: bool = False
    action: str = "stop"
    retries: int = 1
    retry_scale: float = 0.8
    baseline: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"`guard_monitor` must be a metric name, got {self.monitor!r}.")
        if self.mode not in GUARD_MODES:
            raise ValueError(f"`guard_mode` must be one of {GUARD_MODES}, got {self.mode!r}.")
        if self.action not in GUARD_ACTIONS:
            raise ValueError(f"`guard_action` must be one of {GUARD_ACTIONS}, got {self.action!r}.")
        bad = isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
        if bad or not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"`guard_tolerance` must be a finite number >= 0, got {self.tolerance!r}.")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"`guard_retries` must be an integer >= 0, got {self.retries!r}.")
        if isinstance(self.retry_scale, bool) or not isinstance(self.retry_scale, (int, float)):
            raise ValueError(f"`guard_retry_scale` must be a number in (0, 1), got {self.retry_scale!r}.")
        if not 0 < self.retry_scale < 1:
            raise ValueError(f"`guard_retry_scale` must be a number in (0, 1), got {self.retry_scale!r}.")

    def value(self, metrics: Mapping[str, Any]) -> float:
        """The monitored value in ``metrics``.

        Raises:
            ValueError: If the metric is not there, naming the keys that are.
        """
        if self.monitor not in metrics:
            logged = sorted(k for k in metrics if not k.startswith("prune/"))
            raise ValueError(
                f"`guard_monitor` {self.monitor!r} is not among the logged metrics {logged}. Log it (e.g. "
                f"self.log({self.monitor!r}, ...) in validation_step) or pick one of those."
            )
        return float(metrics[self.monitor])

    def verdict(self, metrics: Mapping[str, Any]) -> str | None:
        """``None`` if the monitored value is within tolerance of the baseline, else the reason it is not."""
        if self.baseline is None:
            raise RuntimeError("The guard has no baseline yet.")
        value = self.value(metrics)
        worse = self.baseline - value if self.mode == "max" else value - self.baseline
        allowed = self.tolerance * abs(self.baseline) if self.relative else self.tolerance
        if worse <= allowed or math.isclose(worse, allowed, rel_tol=1e-9, abs_tol=1e-12):
            return None
        return (
            f"{self.monitor} {value:.4g} is worse than the dense {self.baseline:.4g} by {worse:.4g}, "
            f"more than the tolerance {allowed:.4g}"
        )


def gentler(round_: Round, scale: float) -> Round:
    """``round_`` with its quality (criterion ``"std"``) or amount scaled by ``scale``.

    Example::

        >>> gentler(Round(quality={"fc*": 1.5, "*": 1.0}), 0.8).quality
        {'fc*': 1.2000000000000002, '*': 0.8}
    """
    if scale == 1.0:
        return round_

    def scaled(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, Mapping):
            return {k: v * scale for k, v in value.items()}
        return value * scale

    if round_.criterion == "std":
        return dataclasses.replace(round_, quality=scaled(round_.quality))
    return dataclasses.replace(round_, amount=scaled(round_.amount))


AccuracyGuardMode = Literal["max", "min"]
AccuracyGuardAction = Literal["stop", "retry"]
