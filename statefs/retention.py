"""Retention policies: which committed checkpoints a manager keeps.

Each policy looks at the committed checkpoints, oldest first, and returns the
steps to keep. A checkpoint is deleted only when no policy keeps it.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class RetentionPolicy(Protocol):
    def keep(self, checkpoints: Sequence["Checkpoint"]) -> set[int]:  # noqa: F821
        """Return the steps of the checkpoints this policy keeps."""


class KeepLatest:
    """Keep the `n` checkpoints with the highest steps."""

    def __init__(self, n: int):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"KeepLatest needs a positive integer. Received: n={n!r}")
        self.n = n

    def __repr__(self) -> str:
        return f"KeepLatest({self.n})"

    def keep(self, checkpoints) -> set[int]:
        return {checkpoint.step for checkpoint in checkpoints[-self.n:]}


# TODO(#4): KeepEvery (hours or steps) and KeepBest (monitored metric, min or max).


def steps_to_delete(checkpoints, policies: Sequence[RetentionPolicy]) -> list[int]:
    """Return the steps that no policy keeps; with no policies, nothing is deleted."""
    if not policies:
        return []
    keep: set[int] = set()
    for policy in policies:
        keep |= policy.keep(checkpoints)
    return [checkpoint.step for checkpoint in checkpoints if checkpoint.step not in keep]
