"""A quick reachability check for stores behind a custom HTTP endpoint."""

from __future__ import annotations

import socket
import urllib.parse

CONNECT_TIMEOUT_SECONDS = 3.0


def check_reachable(endpoint_url: str | None, option_name: str) -> None:
    """Raise ConnectionError naming `endpoint_url` if no server accepts a connection there.

    Client libraries retry a refused connection for many seconds before they
    fail; one plain TCP connection answers the same question at once.
    """
    if not endpoint_url:
        return
    parsed = urllib.parse.urlsplit(endpoint_url)
    if not parsed.hostname:
        raise ValueError(
            f"Invalid endpoint URL {endpoint_url!r} in storage_options[{option_name!r}]: "
            "expected a URL such as 'http://127.0.0.1:9000'."
        )
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as error:
        raise ConnectionError(
            f"Cannot reach the storage endpoint {endpoint_url}, set by the {option_name!r} "
            f"storage option or its FSSPEC_* environment variable: {error.strerror or error}. "
            "Check that the server is running and the URL is right."
        ) from error
