"""statefs: keep Keras/TensorFlow model state at any fsspec URL.

Checkpoints, numbered versions and single-file snapshots are written through
fsspec backends (local, `memory://`, `s3://`, `gs://` and any other
protocol) with one commit rule: a unit counts once its manifest exists.

`import statefs` does not import TensorFlow; the functions that serialize a
model import it when they run.
"""

__version__ = "0.1.0"

from statefs.checkpoints import Checkpoint, CheckpointManager
from statefs.errors import IntegrityError, ManifestError, NotCommittedError, UnitExistsError
from statefs.gc import GarbageReport, collect_garbage
from statefs.integrity import VerificationReport, verify
from statefs.legacy import StateManagement
from statefs.migration import MigrationReport, migrate
from statefs.retention import KeepBest, KeepEvery, KeepLatest
from statefs.snapshots import Snapshot, load_snapshot, save_snapshot
from statefs.versions import VersionRegistry

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "GarbageReport",
    "IntegrityError",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "ManifestError",
    "MigrationReport",
    "NotCommittedError",
    "Snapshot",
    "StateManagement",
    "UnitExistsError",
    "VerificationReport",
    "VersionRegistry",
    "collect_garbage",
    "load_snapshot",
    "migrate",
    "save_snapshot",
    "verify",
]
