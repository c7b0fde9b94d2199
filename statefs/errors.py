"""The exceptions statefs raises, each a subclass of the matching built-in."""

from __future__ import annotations


class IntegrityError(OSError):
    """Stored bytes differ from what their manifest records.

    Attributes:
        url: the file that failed the check.
        field: what was compared, such as "size" or "crc32c".
        expected: the value the manifest records.
        found: the value read from the store.
    """

    def __init__(self, url: str, field: str, expected: object, found: object):
        self.url = url
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(
            f"Integrity check failed for {url}: {field} is {found!r}, expected {expected!r}. "
            "The file is damaged or was changed after it was committed; "
            "restore it from another copy."
        )

    def __reduce__(self):
        # OSError pickles only its message, which this __init__ does not take.
        return type(self), (self.url, self.field, self.expected, self.found)


class ManifestError(ValueError):
    """A manifest is missing fields, has the wrong types, or names an unsafe path."""


class UnitExistsError(FileExistsError):
    """A checkpoint step, version or copy is already committed, or being written, at that URL."""


class NotCommittedError(FileNotFoundError):
    """No committed unit (no manifest) exists at a URL."""


class ConcurrentUpdateError(FileExistsError):
    """Another writer changed an object between a read and a compare-and-swap.

    Attributes:
        url: the object whose update was rejected.
        expected: the version token the writer expected, or None if it
            expected no object.
    """

    def __init__(self, url: str, expected: str | None):
        self.url = url
        self.expected = expected
        if expected is None:
            found = "expected no object there, but another writer created it"
        else:
            found = f"expected version {expected!r}, but another writer changed or deleted the object"
        super().__init__(
            f"Compare-and-swap of {url} failed: {found}. "
            "Read the object again with read_versioned() and retry the update."
        )

    def __reduce__(self):
        # OSError pickles its message as the only argument, which this
        # __init__ does not take, so an error sent between processes would fail.
        return type(self), (self.url, self.expected)
