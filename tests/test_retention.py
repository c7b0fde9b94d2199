"""Retention policies on small in-memory checkpoint records."""

from __future__ import annotations

import dataclasses
import datetime
import math
import re

import numpy as np
import pytest

from statefs.retention import (
    KeepBest,
    KeepEvery,
    KeepLatest,
    resolve_mode,
    select_for_deletion,
)


@dataclasses.dataclass
class Record:
    step: int
    created: str = ""
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"memory://run/ckpt-{self.step}"


def records(*steps: int) -> list[Record]:
    return [Record(step) for step in steps]


START = datetime.datetime(2026, 12, 4, 22, 0, tzinfo=datetime.timezone.utc)


def at_minutes(*minutes: int) -> list[Record]:
    """Build records one step apart, created the given minutes after START."""
    return [
        Record(step, created=(START + datetime.timedelta(minutes=minute)).isoformat(timespec="seconds"))
        for step, minute in enumerate(minutes)
    ]


def with_metric(*values: float | None, name: str = "val_loss") -> list[Record]:
    return [
        Record(step, metrics={} if value is None else {name: value})
        for step, value in enumerate(values)
    ]


def steps(kept_urls: set[str], among: list[Record]) -> list[int]:
    """Return the steps of the records in `among` whose URL is in `kept_urls`, oldest first."""
    return [record.step for record in among if record.url in kept_urls]


# KeepLatest


def test_keep_latest_keeps_last_n():
    checkpoints = records(1, 2, 3, 4, 5)

    assert steps(KeepLatest(2).keep(checkpoints), checkpoints) == [4, 5]


def test_keep_latest_keeps_all_when_fewer_than_n():
    checkpoints = records(1, 2)

    assert steps(KeepLatest(5).keep(checkpoints), checkpoints) == [1, 2]


def test_keep_latest_of_nothing_is_empty():
    assert KeepLatest(3).keep([]) == set()


# KeepEvery(steps=...)


def test_keep_every_steps_keeps_oldest():
    checkpoints = records(7, 8, 9)

    assert steps(KeepEvery(steps=100).keep(checkpoints), checkpoints) == [7]


def test_keep_every_steps_measures_from_last_kept():
    checkpoints = records(0, 60, 100, 120, 170, 199, 230)

    kept = KeepEvery(steps=100).keep(checkpoints)

    # 100 is 100 steps after 0. Then 230 is the first at least 100 steps after 100.
    assert steps(kept, checkpoints) == [0, 100, 230]


def test_keep_every_steps_starts_at_oldest():
    checkpoints = records(5, 100, 105)

    assert steps(KeepEvery(steps=100).keep(checkpoints), checkpoints) == [5, 105]


# KeepEvery(hours=...)


def test_keep_every_hours_keeps_oldest():
    checkpoints = at_minutes(0, 10, 20)

    assert steps(KeepEvery(hours=1).keep(checkpoints), checkpoints) == [0]


def test_keep_every_hours_measures_from_last_kept():
    checkpoints = at_minutes(0, 50, 70, 100, 129, 130, 185)

    kept = KeepEvery(hours=1).keep(checkpoints)

    # Minute 70 is the first an hour after 0. Then 130 is the first an hour after 70.
    assert steps(kept, checkpoints) == [0, 2, 5]


def test_keep_every_hours_accepts_fraction():
    checkpoints = at_minutes(0, 20, 30, 45, 60)

    assert steps(KeepEvery(hours=0.5).keep(checkpoints), checkpoints) == [0, 2, 4]


def test_keep_every_hours_compares_across_utc_offsets():
    checkpoints = [
        Record(1, created="2026-12-04T22:00:00+00:00"),
        Record(2, created="2026-12-04T23:30:00+01:00"),
        Record(3, created="2026-12-04T23:00:00Z"),
    ]

    # Step 2 is 22:30 UTC, half an hour after step 1.
    assert steps(KeepEvery(hours=1).keep(checkpoints), checkpoints) == [1, 3]


def test_keep_every_hours_treats_naive_time_as_utc():
    checkpoints = [
        Record(1, created="2026-12-04T22:00:00+00:00"),
        Record(2, created="2026-12-04T23:00:00"),
    ]

    assert steps(KeepEvery(hours=1).keep(checkpoints), checkpoints) == [1, 2]


@pytest.mark.parametrize("created", ["", "yesterday", "2026-13-45T99:00:00+00:00"])
def test_keep_every_hours_skips_unknown_time(created):
    checkpoints = at_minutes(0, 30, 60)
    checkpoints[1].created = created

    assert steps(KeepEvery(hours=1).keep(checkpoints), checkpoints) == [0, 2]


def test_keep_every_hours_starts_at_known_time():
    checkpoints = at_minutes(0, 30, 80, 95)
    checkpoints[0].created = ""

    # Minute 80 would follow minute 0 an hour later, but is only 50 minutes after 30.

    assert steps(KeepEvery(hours=1).keep(checkpoints), checkpoints) == [1, 3]


@pytest.mark.parametrize(
    "policy, checkpoints",
    [
        (KeepEvery(steps=100), records(*range(0, 1000, 30))),
        (KeepEvery(hours=1), at_minutes(*range(0, 600, 25))),
    ],
    ids=["steps", "hours"],
)
def test_keep_every_same_after_deleting_unkept(policy, checkpoints):
    first = policy.keep(checkpoints)
    remaining = [record for record in checkpoints if record.url in first]

    assert policy.keep(remaining) == first


def test_keep_every_same_after_rotation_between_saves():
    policy = KeepEvery(steps=100)
    all_records = records(*range(0, 1000, 30))
    stored: list[Record] = []

    for record in all_records:
        stored.append(record)
        deleted = select_for_deletion(stored, [policy, KeepLatest(2)])
        stored = [kept for kept in stored if kept not in deleted]

    chain = policy.keep(all_records)
    assert steps(chain, all_records) == [0, 120, 240, 360, 480, 600, 720, 840, 960]
    assert [record.step for record in stored] == [0, 120, 240, 360, 480, 600, 720, 840, 960, 990]


# KeepBest


def test_keep_best_min_keeps_lowest():
    checkpoints = with_metric(0.9, 0.2, 0.5, 0.1, 0.7)

    assert steps(KeepBest(2, "val_loss", mode="min").keep(checkpoints), checkpoints) == [1, 3]


def test_keep_best_max_keeps_highest():
    checkpoints = with_metric(0.9, 0.2, 0.5, 0.1, 0.7, name="val_accuracy")

    assert steps(KeepBest(2, "val_accuracy", mode="max").keep(checkpoints), checkpoints) == [0, 4]


def test_keep_best_auto_maximizes_accuracy():
    checkpoints = with_metric(0.9, 0.2, 0.5, name="val_accuracy")

    assert steps(KeepBest(1, "val_accuracy").keep(checkpoints), checkpoints) == [0]


def test_keep_best_auto_minimizes_loss():
    checkpoints = with_metric(0.9, 0.2, 0.5)

    assert steps(KeepBest(1, "val_loss").keep(checkpoints), checkpoints) == [1]


def test_keep_best_skips_missing_metric():
    checkpoints = with_metric(None, 0.5, None)

    assert steps(KeepBest(3, "val_loss").keep(checkpoints), checkpoints) == [1]


def test_keep_best_skips_nan():
    checkpoints = with_metric(math.nan, 0.5, 0.7)

    assert steps(KeepBest(1, "val_loss", mode="max").keep(checkpoints), checkpoints) == [2]


def test_keep_best_skips_non_numeric_value():
    checkpoints = with_metric(0.5, 0.7)
    checkpoints[0].metrics["val_loss"] = "n/a"

    assert steps(KeepBest(2, "val_loss").keep(checkpoints), checkpoints) == [1]


def test_keep_best_accepts_numpy_values():
    checkpoints = with_metric(np.float32(0.5), np.float64(0.2))

    assert steps(KeepBest(1, "val_loss").keep(checkpoints), checkpoints) == [1]


def test_keep_best_tie_prefers_newer():
    checkpoints = with_metric(0.3, 0.1, 0.1, 0.1, 0.5)

    assert steps(KeepBest(2, "val_loss").keep(checkpoints), checkpoints) == [2, 3]


def test_keep_best_tie_prefers_newer_in_max_mode():
    checkpoints = with_metric(0.9, 0.9, 0.1, name="val_accuracy")

    assert steps(KeepBest(1, "val_accuracy").keep(checkpoints), checkpoints) == [1]


def test_keep_best_monitor_is_exact_name():
    checkpoints = with_metric(0.1, 0.2, name="loss")

    assert KeepBest(1, "val_loss").keep(checkpoints) == set()


# resolve_mode


@pytest.mark.parametrize(
    "monitor",
    [
        "accuracy",
        "val_accuracy",
        "acc",
        "val_sparse_categorical_accuracy",
        "auc",
        "val_auc_1",
        "precision",
        "val_recall",
        "sensitivity_at_specificity",
        "f1_score",
        "fbeta_score",
        "fmeasure",
        "mean_iou",
        "r2_score",
        "pearson_correlation",
        "cosine_similarity",
        "Val_Accuracy",
    ],
)
def test_resolve_mode_auto_maximizes(monitor):
    assert resolve_mode(monitor, "auto") == "max"


@pytest.mark.parametrize(
    "monitor",
    ["loss", "val_loss", "mae", "val_mean_squared_error", "accuracy_loss", "val_f1_loss"],
)
def test_resolve_mode_auto_minimizes(monitor):
    assert resolve_mode(monitor, "auto") == "min"


@pytest.mark.parametrize("mode", ["min", "max"])
def test_resolve_mode_explicit_wins(mode):
    assert resolve_mode("val_accuracy", mode) == mode
    assert resolve_mode("val_loss", mode) == mode


# select_for_deletion


def test_select_for_deletion_without_policies_is_empty():
    assert select_for_deletion(records(1, 2, 3), []) == []


def test_select_for_deletion_of_nothing_is_empty():
    assert select_for_deletion([], [KeepLatest(1)]) == []


def test_select_for_deletion_returns_unkept_oldest_first():
    checkpoints = records(1, 2, 3, 4, 5)

    assert [record.step for record in select_for_deletion(checkpoints, [KeepLatest(2)])] == [1, 2, 3]


def test_select_for_deletion_returns_the_records():
    checkpoints = records(1, 2)

    assert select_for_deletion(checkpoints, [KeepLatest(1)]) == [checkpoints[0]]


def test_select_for_deletion_keeps_union_of_policies():
    checkpoints = with_metric(0.1, 0.9, 0.8, 0.7, 0.6)

    deleted = select_for_deletion(checkpoints, [KeepLatest(1), KeepBest(1, "val_loss")])

    assert [record.step for record in deleted] == [1, 2, 3]


def test_select_for_deletion_union_of_three_policies():
    checkpoints = records(*range(0, 500, 50))
    for record in checkpoints:
        record.metrics = {"val_loss": 1.0 if record.step != 150 else 0.1}
    policies = [KeepLatest(2), KeepEvery(steps=200), KeepBest(1, "val_loss")]

    deleted = select_for_deletion(checkpoints, policies)

    assert [record.step for record in deleted] == [50, 100, 250, 300, 350]


def test_select_for_deletion_never_deletes_newest():
    checkpoints = with_metric(0.1, 0.2, 0.9)

    deleted = select_for_deletion(checkpoints, [KeepBest(1, "val_loss")])

    assert [record.step for record in deleted] == [1]


def test_select_for_deletion_keeps_newest_without_metric():
    checkpoints = with_metric(0.1, 0.2, None)

    deleted = select_for_deletion(checkpoints, [KeepBest(1, "val_loss")])

    assert [record.step for record in deleted] == [1]


def test_select_for_deletion_accepts_tuples():
    checkpoints = tuple(records(1, 2, 3))

    assert [record.step for record in select_for_deletion(checkpoints, (KeepLatest(1),))] == [1, 2]


# Argument checks


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "3", None])
def test_keep_latest_rejects_bad_n(n):
    with pytest.raises(ValueError, match=re.escape(f"KeepLatest expects `n` to be a positive integer. Received: n={n!r}")):
        KeepLatest(n)


def test_keep_latest_accepts_numpy_integer():
    assert KeepLatest(np.int64(2)).n == 2


def test_keep_every_rejects_neither():
    with pytest.raises(ValueError, match=r"exactly one of `hours` or `steps`\. Received: hours=None, steps=None"):
        KeepEvery()


def test_keep_every_rejects_both():
    with pytest.raises(ValueError, match=r"exactly one of `hours` or `steps`\. Received: hours=1, steps=100"):
        KeepEvery(hours=1, steps=100)


@pytest.mark.parametrize("hours", [0, -1, -0.5, True, math.inf, math.nan, "1"])
def test_keep_every_rejects_bad_hours(hours):
    with pytest.raises(ValueError, match=re.escape(f"KeepEvery expects `hours` to be a positive finite number. Received: hours={hours!r}")):
        KeepEvery(hours=hours)


def test_keep_every_rejects_huge_hours():
    with pytest.raises(ValueError, match=re.escape("KeepEvery expects `hours` to be at most 2.4e+10, the largest datetime.timedelta. Received: hours=1e+300")):
        KeepEvery(hours=1e300)


@pytest.mark.parametrize("bad_steps", [0, -10, 2.5, True, "100"])
def test_keep_every_rejects_bad_steps(bad_steps):
    with pytest.raises(ValueError, match=re.escape(f"KeepEvery expects `steps` to be a positive integer. Received: steps={bad_steps!r}")):
        KeepEvery(steps=bad_steps)


def test_keep_every_takes_keywords_only():
    with pytest.raises(TypeError):
        KeepEvery(1)


@pytest.mark.parametrize("k", [0, -2, 1.0, False])
def test_keep_best_rejects_bad_k(k):
    with pytest.raises(ValueError, match=re.escape(f"KeepBest expects `k` to be a positive integer. Received: k={k!r}")):
        KeepBest(k, "val_loss")


@pytest.mark.parametrize("monitor", ["", None, 3])
def test_keep_best_rejects_bad_monitor(monitor):
    with pytest.raises(ValueError, match=re.escape(f"Expected `monitor` to be a non-empty metric name such as 'val_loss'. Received: monitor={monitor!r}")):
        KeepBest(1, monitor)


@pytest.mark.parametrize("mode", ["minimum", "MAX", "", None])
def test_keep_best_rejects_bad_mode(mode):
    with pytest.raises(ValueError, match=re.escape(f"Expected `mode` to be one of 'auto', 'min' or 'max'. Received: mode={mode!r}")):
        KeepBest(1, "val_loss", mode=mode)


# repr


@pytest.mark.parametrize(
    "policy, text",
    [
        (KeepLatest(3), "KeepLatest(3)"),
        (KeepEvery(hours=1), "KeepEvery(hours=1.0)"),
        (KeepEvery(hours=0.25), "KeepEvery(hours=0.25)"),
        (KeepEvery(steps=500), "KeepEvery(steps=500)"),
        (KeepBest(2, "val_loss"), "KeepBest(2, 'val_loss', mode='min')"),
        (KeepBest(1, "val_accuracy"), "KeepBest(1, 'val_accuracy', mode='max')"),
    ],
)
def test_policy_repr(policy, text):
    assert repr(policy) == text
