"""Any other fsspec protocol, with the weakest guarantees."""

from __future__ import annotations

import warnings

from statefs.backends.base import Backend, Capabilities


class BackendCapabilityWarning(UserWarning):
    """A store lacks a guarantee that the commit protocol relies on."""


class GenericBackend(Backend):
    """A filesystem statefs has no dedicated backend for.

    It assumes no atomic writes, no exclusive create and no compare-and-swap,
    and warns once per protocol when it is first used, naming what is
    missing. Its `compare_and_swap` reads, compares and then writes, so two
    writers that race can both succeed and one update is lost.
    """

    capabilities = Capabilities(atomic_write=False, exclusive_create=False)
    _warned: set[str] = set()

    def __init__(self, fs):
        super().__init__(fs)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol in self._warned:
            return
        self._warned.add(protocol)
        warnings.warn(
            f"statefs has no dedicated backend for the {protocol!r} protocol and uses a "
            f"generic one without {' or '.join(self.capabilities.missing())}. "
            "Commits still work, but a crash or a concurrent writer can leave a partial unit. "
            "Register a backend for this protocol in the 'statefs.backends' entry-point group "
            "to lift this.",
            BackendCapabilityWarning,
            stacklevel=3,
        )
