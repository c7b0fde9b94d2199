"""Multi-worker training: which worker writes, and a barrier to agree on the outcome.

Under `tf.distribute.MultiWorkerMirroredStrategy` every worker runs the same
training program, so every worker calls `CheckpointManager.save`. Only the
chief writes to the store. The other workers wait at a barrier until the
chief reports whether its save committed, and then read the checkpoint the
chief wrote. The barrier is an all-reduce through the strategy, so it needs
no store feature and no channel besides the one the workers already train
over.

TensorFlow is imported only when a program has imported it already, so
`import statefs` stays free of it.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """This process's place in a multi-worker cluster.

    Attributes:
        strategy: the `tf.distribute.MultiWorkerMirroredStrategy` in use.
        is_chief: whether this worker writes checkpoints
            (`strategy.extended.should_checkpoint`).
        task: the task type and index, such as "worker:1", for messages.
    """

    strategy: Any
    is_chief: bool
    task: str

    def agree(self, ok: bool) -> bool:
        """Wait for every worker to report, then return True only if each reported `ok=True`.

        It is a collective all-reduce, so every worker must call it exactly
        once per save, and a worker that never calls it leaves the others
        waiting. Call it in eager mode, outside `strategy.run`.

        Collectives pair up by their order alone. Reading a variable with
        `synchronization=ON_READ` (such as Keras metric totals) outside
        `strategy.run` is an all-reduce too. So if only the chief reads the
        model's variables, the other workers' `agree` pairs with that read.
        It returns as soon as the read runs, before the chief has written
        anything, with a meaningless outcome. Every worker must read the
        same variables, in the same order, before it calls `agree`.

        NOTE: there is no timeout of its own. When a worker process dies,
        TensorFlow's coordination service aborts the collective with
        `tf.errors.UnavailableError` (about 10 seconds after a SIGKILL, in a
        two-worker run on TF 2.21). A worker that is alive but never calls
        `agree` blocks the others indefinitely.
        """
        import tensorflow as tf

        failed = 0.0 if ok else 1.0
        per_replica = self.strategy.experimental_distribute_values_from_function(lambda _: tf.constant(failed))
        # ReduceOp has only SUM and MEAN, so the barrier counts failed replicas.
        failures = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return float(failures) == 0.0


def worker_context(model: Any = None) -> WorkerContext | None:
    """Return the multi-worker context of the strategy in use, or None when one process trains alone.

    The strategy is the one whose scope is open, else the one `model` was
    built under. Only `MultiWorkerMirroredStrategy` with more than one worker
    counts, because there every worker runs the training program. With a
    parameter server strategy only the coordinator runs it, and a TPU
    strategy treats the cluster as one worker.

    Example:

    ```python
    from statefs import distribute

    context = distribute.worker_context(model)
    if context is None or context.is_chief:
        ...  # write the checkpoint
    ```
    """
    # A program that has not imported TensorFlow cannot be in a strategy.
    if "tensorflow" not in sys.modules:
        return None
    strategy = _current_strategy(model)
    if strategy is None or not _in_multi_worker_mode(strategy):
        return None
    return WorkerContext(strategy=strategy, is_chief=bool(strategy.extended.should_checkpoint), task=_task_name(strategy))


def _current_strategy(model: Any) -> Any:
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    return getattr(model, "distribute_strategy", None)


def _in_multi_worker_mode(strategy: Any) -> bool:
    import tensorflow as tf

    # Keras 3.15 makes the same test before it gathers outputs across
    # workers (keras/src/backend/tensorflow/trainer.py). For this strategy
    # `_in_multi_worker_mode()` is "more than one worker in the cluster spec".
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()


def _task_name(strategy: Any) -> str:
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type}:{resolver.task_id}"
