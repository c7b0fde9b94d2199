"""Retention policies: which committed checkpoints a manager keeps.

A policy receives the committed checkpoints, oldest first, and returns the URLs
of those it keeps. Policies compose as a union: a checkpoint stays when any
policy keeps it, and `select_for_deletion` returns the rest. Callers pass only
committed checkpoints, so units still being written and files that statefs did
not write are never candidates for deletion.

A checkpoint record is any object with these attributes (as
`statefs.checkpoints.Checkpoint` has):

- `url` (str): unique id of the checkpoint.
- `step` (int): the records arrive sorted by it, oldest first.
- `created` (str): commit time in ISO 8601 UTC, e.g.
  `"2026-12-04T22:30:05+00:00"`, or `""` when unknown.
- `metrics` (dict[str, float]): the logged metrics, possibly empty.
"""

from __future__ import annotations

import datetime
import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, Protocol

# Parts of the names of Keras 3 metrics that grow as a model improves
# (accuracies, AUC, precision, recall, F-scores, IoU, R2, correlations,
# cosine similarity). Keras 2's ModelCheckpoint maximized only names that
# contain "acc" or start with "fmeasure".
_MAXIMIZED_NAME_PARTS = (
    "acc",
    "auc",
    "precision",
    "recall",
    "sensitivity",
    "specificity",
    "f1",
    "fbeta",
    "fmeasure",
    "iou",
    "r2",
    "correlation",
    "similarity",
)


class RetentionPolicy(Protocol):
    def keep(self, checkpoints: Sequence[Any]) -> set[str]:
        """Return the URLs of the checkpoints this policy keeps."""


class KeepLatest:
    """Keep the `n` newest checkpoints.

    Example:

    ```python
    ckpts = statefs.CheckpointManager(
        url, max_to_keep=None, keep=[statefs.KeepLatest(3), statefs.KeepBest(1, "val_loss")]
    )
    ```
    """

    def __init__(self, n: int):
        self.n = _positive_integer("KeepLatest", "n", n)

    def __repr__(self) -> str:
        return f"KeepLatest({self.n})"

    def keep(self, checkpoints: Sequence[Any]) -> set[str]:
        return {checkpoint.url for checkpoint in checkpoints[-self.n :]}


class KeepEvery:
    """Keep one checkpoint per `hours` of wall-clock time or per `steps` steps.

    The policy keeps the oldest checkpoint. After it, a checkpoint is kept
    when it was created at least `hours` after the last checkpoint this
    policy kept (or when its step is at least `steps` past that one's step).
    `tf.train.CheckpointManager(keep_checkpoint_every_n_hours=...)` uses the
    same chain. Each choice depends only on older kept checkpoints, so
    deleting the checkpoints that no policy keeps does not change it, and a
    restarted manager rebuilds the same choice from the store.

    With `hours`, a checkpoint whose `created` time is empty or cannot be
    parsed as ISO 8601 is never kept by this policy, and the chain starts at the oldest
    checkpoint whose time is known. A time without a UTC offset counts as UTC.

    Example:

    ```python
    ckpts = statefs.CheckpointManager(
        url, max_to_keep=3, keep=[statefs.KeepEvery(hours=1), statefs.KeepBest(2, "val_loss")]
    )
    ```

    Args:
        hours: minimum time between kept checkpoints, in hours (may be a
            fraction).
        steps: minimum number of steps between kept checkpoints.
    """

    def __init__(self, *, hours: float | None = None, steps: int | None = None):
        if (hours is None) == (steps is None):
            raise ValueError(
                "KeepEvery expects exactly one of `hours` or `steps`. "
                f"Received: hours={hours!r}, steps={steps!r}"
            )
        self.hours = None
        self.steps = None
        if steps is not None:
            self.steps = _positive_integer("KeepEvery", "steps", steps)
            self._interval = self.steps
        else:
            self.hours = _positive_number("KeepEvery", "hours", hours)
            self._interval = _hours_as_timedelta(self.hours)

    def __repr__(self) -> str:
        if self.hours is not None:
            return f"KeepEvery(hours={self.hours!r})"
        return f"KeepEvery(steps={self.steps!r})"

    def keep(self, checkpoints: Sequence[Any]) -> set[str]:
        kept: set[str] = set()
        last = None
        for checkpoint in checkpoints:
            position = self._position(checkpoint)
            if position is None:
                continue
            if last is None or position - last >= self._interval:
                kept.add(checkpoint.url)
                last = position
        return kept

    def _position(self, checkpoint: Any) -> Any:
        """Return the step, or the creation time as a datetime, or None when unknown."""
        if self.steps is not None:
            return checkpoint.step
        return _parse_utc(checkpoint.created)


class KeepBest:
    """Keep the `k` checkpoints with the best value of the metric `monitor`.

    Checkpoints that did not log `monitor`, or logged NaN, are never kept by
    this policy. When values tie, the newer checkpoint wins.

    Example:

    ```python
    ckpts = statefs.CheckpointManager(url, max_to_keep=2, keep=[statefs.KeepBest(3, "val_accuracy")])
    ```

    Args:
        k: how many checkpoints to keep.
        monitor: the metric name as Keras logs it, e.g. `"val_loss"`.
        mode: `"min"`, `"max"` or `"auto"` (see `resolve_mode`).
    """

    def __init__(self, k: int, monitor: str, mode: str = "auto"):
        self.k = _positive_integer("KeepBest", "k", k)
        self.mode = resolve_mode(monitor, mode)
        self.monitor = monitor

    def __repr__(self) -> str:
        return f"KeepBest({self.k}, {self.monitor!r}, mode={self.mode!r})"

    def keep(self, checkpoints: Sequence[Any]) -> set[str]:
        scored = []
        for index, checkpoint in enumerate(checkpoints):
            value = _metric_value(checkpoint, self.monitor)
            if value is not None:
                # Negating makes the best value sort highest in both modes,
                # and the index breaks ties in favour of the newer checkpoint.
                score = value if self.mode == "max" else -value
                scored.append((score, index, checkpoint.url))
        scored.sort(reverse=True)
        return {url for _, _, url in scored[: self.k]}


def resolve_mode(monitor: str, mode: str) -> Literal["min", "max"]:
    """Return whether a better `monitor` value is lower ("min") or higher ("max").

    `"auto"` means `"max"` when the name, lower-cased and without a leading
    `"val_"`, does not end in `"loss"` and contains one of: acc, auc,
    precision, recall, sensitivity, specificity, f1, fbeta, fmeasure, iou, r2,
    correlation, similarity. That covers the names of the Keras 3 built-in
    metrics that grow as a model improves (`accuracy`, `auc_1`, `f1_score`,
    `mean_iou`...). Every other name means `"min"`, so pass `mode="max"` for a
    custom metric that should grow.

    Keras 3's own callbacks read the direction from the compiled metric
    objects instead. This rule needs only the name, so it also works on
    metrics read back from stored checkpoints, without a model.

    Example:

    ```python
    statefs.retention.resolve_mode("val_accuracy", "auto")  # "max"
    ```
    """
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(
            f"Expected `monitor` to be a non-empty metric name such as 'val_loss'. Received: monitor={monitor!r}"
        )
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"Expected `mode` to be one of 'auto', 'min' or 'max'. Received: mode={mode!r}")
    if mode != "auto":
        return mode
    name = monitor.lower().removeprefix("val_")
    if not name.endswith("loss") and any(part in name for part in _MAXIMIZED_NAME_PARTS):
        return "max"
    return "min"


def select_for_deletion(checkpoints: Sequence[Any], policies: Sequence[RetentionPolicy]) -> list[Any]:
    """Return the checkpoints that no policy keeps, oldest first.

    With no policies nothing is deleted. The newest checkpoint is never
    returned, because it is the one a restarted job resumes from.
    """
    checkpoints = list(checkpoints)
    if not policies or not checkpoints:
        return []
    kept_urls = {checkpoints[-1].url}
    for policy in policies:
        kept_urls |= policy.keep(checkpoints)
    return [checkpoint for checkpoint in checkpoints if checkpoint.url not in kept_urls]


def _positive_integer(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner} expects `{name}` to be a positive integer. Received: {name}={value!r}")
    return int(value)


def _positive_number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{owner} expects `{name}` to be a positive finite number. Received: {name}={value!r}")
    return float(value)


def _hours_as_timedelta(hours: float) -> datetime.timedelta:
    try:
        return datetime.timedelta(hours=hours)
    except OverflowError:
        limit = datetime.timedelta.max.total_seconds() / 3600
        raise ValueError(
            f"KeepEvery expects `hours` to be at most {limit:.3g}, the largest datetime.timedelta. "
            f"Received: hours={hours!r}"
        ) from None


def _parse_utc(created: Any) -> datetime.datetime | None:
    """Return `created` as an aware datetime, or None when it is missing or cannot be parsed."""
    if not isinstance(created, str) or not created:
        return None
    # Python 3.10's fromisoformat rejects the "Z" suffix.
    text = created[:-1] + "+00:00" if created.endswith("Z") else created
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=datetime.timezone.utc)
    return moment


def _metric_value(checkpoint: Any, monitor: str) -> float | None:
    """Return the logged value of `monitor`, or None when it is missing, not a number or NaN."""
    try:
        value = float(checkpoint.metrics[monitor])
    except (KeyError, TypeError, ValueError):
        return None
    if math.isnan(value):
        return None
    return value
