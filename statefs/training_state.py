"""The training state a checkpoint holds, and how it is written and read.

A checkpoint unit stores two payload files:

- `state.bin`: the bytes of every variable, one after another, in C order;
- `state.json`: the index of those bytes (group, name, dtype, shape, offset)
  and the trainer's position: step, epoch, batch within the epoch, the states
  of the random generators and the caller's extra state.

Keras's `save_weights` was rejected for checkpoints for three reasons. It
reads the live variables while it writes, so it cannot write in the
background while training goes on. It carries no RNG state or position. And
h5py wants a local file, which costs a staging copy on every remote save.
The raw format streams through any backend. A restore reads and checks every
byte before it assigns anything, so a damaged checkpoint never leaves a
model half restored.

TensorFlow and Keras are imported inside the functions, so that
`import statefs` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from statefs.backends import Backend
from statefs.checksums import CHUNK_SIZE, Crc32c, Digest, digest_bytes
from statefs.commit import UnitWriter, check_digest
from statefs.errors import ManifestError
from statefs.manifest import Manifest

logger = logging.getLogger(__name__)

STATE_FILE = "state.bin"
INDEX_FILE = "state.json"
FORMAT = "statefs-training-state-1"
ALIGNMENT = 64


@dataclasses.dataclass(frozen=True)
class Position:
    """Training's position when the state was captured.

    `epoch` counts the epochs completed and `batch` the batches completed in
    the epoch under way, so a loop resumes at batch `batch` of epoch `epoch`.
    """

    step: int
    epoch: int | None = None
    batch: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class CapturedState:
    """The model's state at one moment, held so that it can be written while training goes on.

    With TensorFlow, capturing reads each variable into a tensor without
    copying it: TensorFlow copies a variable's buffer before an update when a
    tensor still refers to it, so the captured values stay those of the
    moment of capture. The copy to host memory is made while writing, one
    variable at a time. Other Keras backends copy to host memory at once.
    """

    def __init__(self, model: Any, position: Position, *, rng: bool = True):
        self.position = position
        self.entries: list[dict[str, Any]] = []
        self._values: list[Any] = []
        for group, variables in _variable_groups(model).items():
            for variable in variables:
                self._add(group, variable)
        self.rng = capture_rng() if rng else None
        self._index = self._index_json()

    @property
    def size(self) -> int:
        return sum(entry["size"] for entry in self.entries)

    def chunks(self) -> Iterator[np.ndarray]:
        """Yield the bytes of `state.bin` as read-only arrays of at most CHUNK_SIZE bytes."""
        for value in self._values:
            flat = np.ascontiguousarray(_to_numpy(value)).reshape(-1).view(np.uint8)
            flat.flags.writeable = False
            for start in range(0, flat.size, CHUNK_SIZE):
                yield flat[start:start + CHUNK_SIZE]

    def write(self, writer: UnitWriter) -> None:
        """Upload `state.bin`, then `state.json`, into the unit being written."""
        writer.put_chunks(STATE_FILE, self.chunks())
        writer.put_chunks(INDEX_FILE, [self._index])
        self._values = []

    def _add(self, group: str, variable: Any) -> None:
        dtype = _numpy_dtype(variable.dtype)
        shape = [int(dimension) for dimension in variable.shape]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset = self.size
        self.entries.append(
            {"group": group, "name": _variable_name(variable), "dtype": dtype.name, "shape": shape, "offset": offset, "size": size}
        )
        self._values.append(_read_value(variable))

    def _index_json(self) -> bytes:
        index = {
            "format": FORMAT,
            "byteorder": sys.byteorder,
            "position": dataclasses.asdict(self.position),
            "rng": self.rng,
            "variables": self.entries,
        }
        try:
            return json.dumps(index, default=_json_value).encode()
        except TypeError as error:
            raise TypeError(
                f"The extra state of a checkpoint must be JSON-serializable (dicts, lists, strings, numbers, "
                f"NumPy values): {error}. Received: extra={self.position.extra!r:.200}"
            ) from None


@dataclasses.dataclass
class LoadedState:
    """A checkpoint's state read into host memory and checked, not yet assigned."""

    url: str
    position: Position
    rng: dict[str, Any] | None
    entries: list[dict[str, Any]]
    arrays: list[np.ndarray]

    def assign(self, model: Any, *, restore_rng: bool = True) -> None:
        """Assign the state to `model` and, if asked, to the random generators.

        Every group is checked against the model before the first assignment,
        so a mismatch changes nothing.
        """
        groups = _variable_groups(model, build_optimizer=True)
        plan = self._plan(groups)
        for variable, array in plan:
            variable.assign(_Handover(array))
        self.arrays = []
        if restore_rng and self.rng is not None:
            restore_rng_state(self.rng)
        logger.debug("Assigned %d variables from %s", len(plan), self.url)

    def _plan(self, groups: dict[str, list[Any]]) -> list[tuple[Any, np.ndarray]]:
        saved: dict[str, list[int]] = {}
        for position, entry in enumerate(self.entries):
            saved.setdefault(entry["group"], []).append(position)
        plan = []
        for group, positions in saved.items():
            variables = groups.get(group, [])
            if group == "metrics" and not _fits(variables, [self.entries[p] for p in positions]):
                # Compiled metrics are built by the first training step, so a
                # model restored before it has none; they restart from zero.
                logger.debug("Not restoring metric state from %s: the model's metrics differ.", self.url)
                continue
            if group == "optimizer" and not variables:
                logger.info("Not restoring optimizer state from %s: the model has no optimizer.", self.url)
                continue
            self._check_group(group, variables, positions)
            plan += [(variable, self.arrays[p]) for variable, p in zip(variables, positions)]
        return plan

    def _check_group(self, group: str, variables: list[Any], positions: list[int]) -> None:
        if len(variables) != len(positions):
            raise ValueError(
                f"Checkpoint {self.url} does not match this model: it contains {len(positions)} {group} variables, "
                f"the model has {len(variables)}. Restore into a model built like the one that was saved."
            )
        for variable, p in zip(variables, positions):
            entry = self.entries[p]
            shape = [int(dimension) for dimension in variable.shape]
            if shape != entry["shape"] or _numpy_dtype(variable.dtype).name != entry["dtype"]:
                raise ValueError(
                    f"Checkpoint {self.url} does not match this model: {group} variable {entry['name']!r} was saved "
                    f"as {entry['dtype']}{entry['shape']}, but the model's {_variable_name(variable)!r} is "
                    f"{_numpy_dtype(variable.dtype).name}{shape}. Restore into a model built like the one that was saved."
                )


class _Handover:
    """Hands an array that nothing else will touch to `assign`, so that TensorFlow adopts its buffer.

    TensorFlow copies every `np.ndarray` it converts, in case the caller
    changes it later. An object that only offers `__array__` is converted
    without that copy when its data is 64-byte aligned. This saves one copy
    of the whole state per restore.
    """

    def __init__(self, array: np.ndarray):
        self.array = array

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.array if dtype is None else self.array.astype(dtype, copy=False)


def read_state(backend: Backend, prefix: str, manifest: Manifest, *, verify_checksums: bool = True) -> LoadedState:
    """Read and check a checkpoint's state; raise IntegrityError before returning anything damaged."""
    url = backend.url(prefix)
    index_path = backend.join(prefix, INDEX_FILE)
    data = backend.read_bytes(index_path)
    check_digest(backend.url(index_path), _expected(manifest, INDEX_FILE, url), digest_bytes(data), checksum=verify_checksums)
    index = _parse_index(data, backend.url(index_path))
    state_path = backend.join(prefix, STATE_FILE)
    expected = _expected(manifest, STATE_FILE, url)
    with backend.open_read(state_path) as reader:
        arrays, digest = _read_arrays(reader, index["variables"])
    check_digest(backend.url(state_path), expected, digest, checksum=verify_checksums)
    position = Position(**index["position"])
    return LoadedState(url=url, position=position, rng=index.get("rng"), entries=index["variables"], arrays=arrays)


def _read_arrays(reader: Any, entries: list[dict[str, Any]]) -> tuple[list[np.ndarray], Digest]:
    """Read each variable's bytes into a new array, hashing everything read, trailing bytes included."""
    checksum = Crc32c()
    arrays, size = [], 0
    for entry in entries:
        array = _aligned_empty(entry["shape"], _numpy_dtype(entry["dtype"]))
        flat = array.reshape(-1).view(np.uint8)
        read = _read_fully(reader, flat)
        for start in range(0, read, CHUNK_SIZE):
            checksum.update(_read_only(flat[start:min(start + CHUNK_SIZE, read)]))
        size += read
        if read < flat.size:
            return arrays, Digest(size=size, crc32c=checksum.value())
        arrays.append(array)
    # Bytes beyond the index still count, so a file longer than the index fails the size check.
    while rest := reader.read(CHUNK_SIZE):
        checksum.update(rest)
        size += len(rest)
    return arrays, Digest(size=size, crc32c=checksum.value())


def _aligned_empty(shape: list[int], dtype: np.dtype) -> np.ndarray:
    """Return an uninitialised array whose data starts on a 64-byte boundary.

    TensorFlow converts such an array to a tensor without a second copy. An
    array that NumPy placed 16 bytes into a page costs one more copy per
    assignment.
    """
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(size + ALIGNMENT, dtype=np.uint8)
    offset = -buffer.ctypes.data % ALIGNMENT
    return buffer[offset:offset + size].view(dtype).reshape(shape)


def _read_fully(reader: Any, flat: np.ndarray) -> int:
    view = memoryview(flat).cast("B")
    done = 0
    while done < len(view):
        read = reader.readinto(view[done:])
        if not read:
            break
        done += read
    return done


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _expected(manifest: Manifest, name: str, url: str) -> Digest:
    try:
        return manifest.files[name]
    except KeyError:
        raise ManifestError(f"Invalid checkpoint {url}: its manifest does not list {name}.") from None


def _parse_index(data: bytes, url: str) -> dict[str, Any]:
    try:
        index = json.loads(data)
    except ValueError as error:
        raise ManifestError(f"Invalid state index {url}: {error}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ManifestError(f"Invalid state index {url}: expected format {FORMAT!r}. Received: {str(index)[:80]!r}")
    if index.get("byteorder", sys.byteorder) != sys.byteorder:
        raise ManifestError(f"{url} was written on a {index['byteorder']}-endian machine; this one is {sys.byteorder}-endian.")
    return index


def _variable_groups(model: Any, *, build_optimizer: bool = False) -> dict[str, list[Any]]:
    """Return the variables to save, by group, in an order that two models built alike share."""
    groups = {"model": list(model.variables)}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and build_optimizer and not optimizer.built and model.built:
        # Under a tf.distribute strategy the slots must be created in its scope.
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            optimizer.build(model.trainable_variables)
    if optimizer is not None and getattr(optimizer, "built", False):
        groups["optimizer"] = list(optimizer.variables)
    groups["metrics"] = list(getattr(model, "metrics_variables", []))
    return groups


def _fits(variables: list[Any], entries: list[dict[str, Any]]) -> bool:
    if len(variables) != len(entries):
        return False
    return all([int(d) for d in variable.shape] == entry["shape"] for variable, entry in zip(variables, entries))


def _read_value(variable: Any) -> Any:
    value = variable.value
    if hasattr(value, "read_value"):
        # A TensorFlow tensor that shares the variable's buffer until the next update copies it.
        return value.read_value()
    import keras

    return keras.ops.convert_to_numpy(value)


def _to_numpy(value: Any) -> np.ndarray:
    """Return a read-only view of a CPU tensor's buffer, or a copy where no view is possible."""
    if not hasattr(value, "numpy"):
        return np.asarray(value)
    try:
        # Tensor.numpy() copies the whole tensor (TensorFlow 2.21), and its
        # docstring names memoryview as the way to read a CPU tensor without a
        # copy. NumPy cannot read a bfloat16 buffer, so those tensors are copied.
        return np.asarray(memoryview(value))
    except (TypeError, ValueError):
        return np.asarray(value.numpy())


def _numpy_dtype(name: Any) -> np.dtype:
    name = getattr(name, "name", name)
    try:
        return np.dtype(name)
    except TypeError:
        # bfloat16 and the float8 types live in ml_dtypes, which TensorFlow and Keras depend on.
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, str(name)))


def _variable_name(variable: Any) -> str:
    return str(getattr(variable, "path", None) or getattr(variable, "name", "?"))


def _json_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def capture_rng() -> dict[str, Any]:
    """Return the states of Python's, NumPy's, TensorFlow's and Keras's global random generators."""
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }
    generator = _tensorflow_global_generator()
    if generator is not None:
        state["tensorflow"] = {"algorithm": int(generator.algorithm), "state": generator.state.numpy().tolist()}
    keras_generator = _keras_global_seed_generator(create=False)
    if keras_generator is not None:
        state["keras"] = _to_numpy(_read_value(keras_generator.state)).tolist()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global random generators to a state returned by `capture_rng`."""
    # Keras and TensorFlow first: creating Keras's global seed generator
    # draws from Python's `random`, which must be restored after it.
    if "keras" in state:
        generator = _keras_global_seed_generator(create=True)
        generator.state.assign(np.asarray(state["keras"], dtype=_numpy_dtype(generator.state.dtype)))
    if "tensorflow" in state:
        _restore_tensorflow_generator(state["tensorflow"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _restore_tensorflow_generator(saved: dict[str, Any]) -> None:
    import tensorflow as tf

    generator = _tensorflow_global_generator()
    if generator is not None and int(generator.algorithm) == saved["algorithm"]:
        # Resetting in place keeps references that user code holds to the generator valid.
        generator.reset(np.asarray(saved["state"], dtype=np.int64))
    else:
        tf.random.set_global_generator(tf.random.Generator.from_state(saved["state"], saved["algorithm"]))


def _tensorflow_global_generator() -> Any:
    """Return TensorFlow's global `tf.random.Generator`, or None.

    With op determinism enabled, TensorFlow refuses to create the global
    generator itself until the program sets one, so there is none to save.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return None
    try:
        return tf.random.get_global_generator()
    except RuntimeError:
        return None


def _keras_global_seed_generator(*, create: bool) -> Any:
    """Return the seed generator that `keras.random` functions use when given no seed.

    Keras keeps it in private modules (keras.src.backend.common.global_state
    and keras.src.random.seed_generator in 3.15). If they move, its state is
    not saved, and a debug message reports it.
    """
    if "keras" not in sys.modules:
        return None
    try:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator
    except ImportError as error:
        logger.debug("Cannot reach Keras's global seed generator: %s", error)
        return None
    generator = global_state.get_global_attribute("global_seed_generator")
    if generator is None and create:
        generator = seed_generator.global_seed_generator()
    return generator
