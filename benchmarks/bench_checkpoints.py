"""Checkpoint timings: background saves against blocking ones, and statefs against Keras weights files.

Each row runs a baseline and statefs on the same model in this process,
alternating after one warm-up of each, and reports the ratio of their median
times against a target. The model is an MLP of three Dense layers trained
one step, so its Adam slots exist. Results go to
benchmarks/results/checkpoints.{json,md,png}.

    python benchmarks/bench_checkpoints.py                      # 40M parameters, S3 on moto included
    python benchmarks/bench_checkpoints.py --params 200000 --repeats 2 --no-servers   # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH = 8

# A side runs one repeat and returns the seconds it measured, so that it can
# keep setup work, such as starting a background save, out of the timing.
Side = Callable[[], float]


def build_model(params: int):
    """Return a compiled MLP of about `params` weights whose Adam state is built."""
    import keras
    import numpy as np

    width = int((params / 3) ** 0.5)
    model = keras.Sequential(
        [keras.Input((width,)), keras.layers.Dense(width), keras.layers.Dense(width), keras.layers.Dense(width)]
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.zeros((BATCH, width), dtype="float32")
    model.fit(x, x, epochs=1, verbose=0)
    return model


def timed(action: Callable[[], Any]) -> Side:
    def side() -> float:
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    return side


def compare(
    name: str,
    description: str,
    baseline: Side,
    candidate: Side,
    *,
    repeats: int,
    target: float | None,
    settle: Callable[[], None],
) -> dict:
    """Run both sides, interleaved after one warm-up each, and return the row of their medians.

    `settle` runs after every call, outside the timed region.
    """
    baseline_times, candidate_times = [], []
    for index in range(repeats + 1):
        for side, times in ((baseline, baseline_times), (candidate, candidate_times)):
            seconds = side()
            settle()
            if index > 0:
                times.append(seconds)
    base, cand = statistics.median(baseline_times), statistics.median(candidate_times)
    ratio = cand / base
    row = {
        "name": name,
        "benchmark": description,
        "baseline_s": base,
        "statefs_s": cand,
        "ratio": ratio,
        "target": target,
        "passed": None if target is None else ratio <= target,
        "repeats": repeats,
        "baseline_samples_s": baseline_times,
        "statefs_samples_s": candidate_times,
    }
    print(f"{description:70s} baseline {base:8.3f} s  statefs {cand:8.3f} s  ratio {ratio:7.3g}  {_verdict(row)}", flush=True)
    return row


def _result(row: dict) -> str:
    if row["passed"] is None:
        return "informative"
    if row["passed"]:
        return "pass"
    return "fail"


def _verdict(row: dict) -> str:
    if row["target"] is None:
        return "(informative)"
    return f"{_result(row).upper()} (target <= {row['target']:.2f})"


def settle_disk() -> None:
    """Flush dirty pages, so that one side's writeback does not land in the other side's timing."""
    os.sync()


def stall_row(name: str, description: str, manager: Any, model: Any, steps: Any, repeats: int, settle: Callable[[], None]) -> dict:
    """Time a blocking save against the call that starts a background save, which is awaited outside the timing."""

    def settle_all() -> None:
        manager.wait()
        settle()

    return compare(
        name,
        description,
        timed(lambda: manager.save(model, step=next(steps), blocking=True)),
        timed(lambda: manager.save(model, step=next(steps), blocking=False)),
        repeats=repeats,
        target=0.05,
        settle=settle_all,
    )


def training_row(manager: Any, model: Any, steps: Any, repeats: int, train_steps: int) -> dict:
    """Time `train_steps` training steps alone, and again while a background save writes."""
    import numpy as np

    x = np.random.default_rng(0).random((BATCH, model.inputs[0].shape[1]), dtype=np.float32)
    save_seconds: list[float] = []
    still_running: list[bool] = []

    def train() -> float:
        started = time.perf_counter()
        for _ in range(train_steps):
            model.train_on_batch(x, x)
        return time.perf_counter() - started

    def train_during_save() -> float:
        started = time.perf_counter()
        recorded = threading.Event()

        def record(_: Any) -> None:
            save_seconds.append(time.perf_counter() - started)
            recorded.set()

        future = manager.save(model, step=next(steps), blocking=False)
        future.add_done_callback(record)
        seconds = train()
        still_running.append(not future.done())
        # Futures run their callbacks after waking waiters, so wait for the callback itself.
        recorded.wait()
        return seconds

    def settle() -> None:
        manager.wait()
        settle_disk()

    row = compare(
        "training_during_async_save_file",
        f"training steps, file: {train_steps} train_on_batch steps alone vs during a background save",
        train,
        train_during_save,
        repeats=repeats,
        target=None,
        settle=settle,
    )
    # The warm-up's save is left out, as the warm-up's timings are.
    row["train_steps"] = train_steps
    row["batch_size"] = BATCH
    row["background_save_s"] = statistics.median(save_seconds[1:])
    row["save_still_running_after_steps"] = sum(still_running[1:])
    return row


def run(params: int, repeats: int, s3_repeats: int, train_steps: int, with_servers: bool) -> list[dict]:
    import statefs

    model = build_model(params)
    steps = itertools.count()
    rows = []
    with tempfile.TemporaryDirectory(prefix="statefs-bench-", dir="/tmp") as folder:
        manager = statefs.CheckpointManager(os.path.join(folder, "ckpt"), max_to_keep=1)
        rows.append(stall_row(
            "async_stall_file",
            "async save stall, file: save(blocking=True) vs save(blocking=False) call",
            manager, model, steps, repeats, settle_disk,
        ))
        rows.append(training_row(manager, model, steps, repeats, train_steps))
        weights = os.path.join(folder, "keras.weights.h5")
        rows.append(compare(
            "save_file_vs_keras_save_weights",
            "checkpoint save, file: Keras save_weights vs statefs save",
            timed(lambda: model.save_weights(weights)),
            timed(lambda: manager.save(model, step=next(steps))),
            repeats=repeats,
            target=1.10,
            settle=settle_disk,
        ))
        rows.append(compare(
            "restore_file_vs_keras_load_weights",
            "checkpoint restore, file: Keras load_weights vs statefs restore",
            timed(lambda: model.load_weights(weights)),
            timed(lambda: manager.restore(model)),
            repeats=repeats,
            target=1.10,
            settle=lambda: None,
        ))
        manager.close()
    if with_servers:
        rows.insert(1, s3_stall_row(model, steps, s3_repeats))
    return rows


def s3_stall_row(model: Any, steps: Any, repeats: int) -> dict:
    from statefs.backends.emulators import S3Emulator

    import statefs

    with S3Emulator() as s3:
        s3.create_bucket("bench")
        with statefs.CheckpointManager("s3://bench/ckpt", max_to_keep=1, storage_options=s3.storage_options()) as manager:
            return stall_row(
                "async_stall_s3",
                "async save stall, s3 (moto): save(blocking=True) vs save(blocking=False) call",
                manager, model, steps, repeats, lambda: None,
            )


def notes(rows: list[dict], repeats: int, s3_repeats: int) -> list[str]:
    lines = [
        "Each side runs once as a warm-up, then the sides alternate; the warm-up is not timed.",
        (
            "Async stall rows time only the `save(..., blocking=False)` call, which is what the training thread waits for. "
            "`manager.wait()` runs after every call, outside the timed region, so each background save starts with no save in flight."
        ),
        (
            "On the file backend `os.sync()` also runs between calls, outside the timed region, "
            "so that the writeback of one side's files is not timed on the other side. "
            "statefs fsyncs the files it writes; Keras `save_weights` does not."
        ),
        f"File rows: {repeats} timed repeats per side.",
    ]
    s3 = [row for row in rows if row["name"] == "async_stall_s3"]
    if s3:
        lines.append(
            f"S3 row: {s3_repeats} timed repeats per side, because a blocking save to the moto server "
            f"(in this process, on 127.0.0.1) took {s3[0]['baseline_s']:.1f} s."
        )
    save = next(row for row in rows if row["name"] == "save_file_vs_keras_save_weights")
    lines.append(
        f"Save row: Keras took {min(save['baseline_samples_s']):.3f} to {max(save['baseline_samples_s']):.3f} s over the timed repeats, "
        f"statefs {min(save['statefs_samples_s']):.3f} to {max(save['statefs_samples_s']):.3f} s. "
        "Keras overwrites one file, while statefs writes a new file and then deletes the previous checkpoint."
    )
    training = next(row for row in rows if row["name"] == "training_during_async_save_file")
    stall = next(row for row in rows if row["name"] == "async_stall_file")
    lines.append(
        f"Training row: {training['train_steps']} `train_on_batch` steps on a batch of {training['batch_size']}; the timed steps "
        "start as soon as `save(blocking=False)` returns. "
        f"They took {training['statefs_s'] - training['baseline_s']:.3f} s longer than with no save in flight. "
        f"The background save took {training['background_save_s']:.3f} s (median) while training ran, against "
        f"{stall['baseline_s']:.3f} s for a blocking save with nothing else running. It was still writing when the "
        f"steps ended in {training['save_still_running_after_steps']} of {training['repeats']} repeats. "
        f"The writer thread and the trainer share {os.cpu_count()} cores, and the first update of each variable "
        "after the capture copies it, because the save still refers to the old buffer. There is no target."
    )
    return lines


def write_results(rows: list[dict], params: int, repeats: int, s3_repeats: int, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    document = {
        "params": params,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "notes": notes(rows, repeats, s3_repeats),
        "rows": rows,
    }
    with open(os.path.join(folder, "checkpoints.json"), "w") as handle:
        json.dump(document, handle, indent=2)
    lines = [
        f"# Checkpoint saves and restores ({params:,} parameters, Adam)",
        "",
        f"Machine: {document['machine']}. Median of interleaved runs; ratio = statefs / baseline.",
        "",
        "| benchmark | baseline (s) | statefs (s) | ratio | target | result |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        target = "–" if row["target"] is None else f"≤ {row['target']:.2f}"
        lines.append(
            f"| {row['benchmark']} | {row['baseline_s']:.3f} | {row['statefs_s']:.4f} | {row['ratio']:.3g} | {target} | {_result(row)} |"
        )
    lines += ["", "Notes:", ""] + [f"- {note}" for note in document["notes"]]
    with open(os.path.join(folder, "checkpoints.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    _plot(rows, os.path.join(folder, "checkpoints.png"))


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the PNG (pip install matplotlib)", file=sys.stderr)
        return
    colors = {True: "#55a868", False: "#c44e52", None: "#8c8c8c"}
    figure, axis = plt.subplots(figsize=(9, 1 + 0.8 * len(rows)))
    labels = [row["benchmark"].split(":")[0] for row in rows]
    axis.barh(labels, [row["ratio"] for row in rows], color=[colors[row["passed"]] for row in rows])
    for position, row in enumerate(rows):
        if row["target"] is not None:
            axis.plot([row["target"]] * 2, [position - 0.4, position + 0.4], color="black", linewidth=2)
    axis.axvline(1.0, color="black", linewidth=1, linestyle=":")
    # Background-save stall ratios are 100 to 10 000 times below 1, so a linear axis would hide them.
    axis.set_xscale("log")
    axis.set_xlim(right=1.5 * max([row["ratio"] for row in rows] + [row["target"] or 0 for row in rows]))
    axis.set_xlabel("statefs time / baseline time (log scale; black tick = target, green = pass, grey = no target)")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=40_000_000, help="model size in weights (default 40M)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each side in the file rows (default 7)")
    parser.add_argument("--s3-repeats", type=int, default=3, help="timed runs of each side in the S3 row (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed in the training row (default 10)")
    parser.add_argument("--no-servers", action="store_true", help="skip the S3 row and its moto server")
    parser.add_argument("--results", default=RESULTS, help="folder for checkpoints.{json,md,png} (default benchmarks/results)")
    args = parser.parse_args()
    rows = run(args.params, args.repeats, args.s3_repeats, args.steps, not args.no_servers)
    write_results(rows, args.params, args.repeats, args.s3_repeats, args.results)


if __name__ == "__main__":
    main()
