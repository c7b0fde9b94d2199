"""Amazon S3 and S3-compatible stores through s3fs.

Endpoint and region of an S3-compatible store go in `storage_options`,
exactly as s3fs takes them: `{"endpoint_url": ..., "client_kwargs":
{"region_name": ...}}`.
"""

from __future__ import annotations

from statefs.backends._endpoint import check_reachable
from statefs.backends.base import Backend, Capabilities


class S3Backend(Backend):
    """An S3 bucket.

    An object appears whole when its upload completes, and an aborted
    multipart upload leaves no object. `create_exclusive` sends
    `If-None-Match: *`, which S3 enforces on the server.
    """

    protocols = ("s3", "s3a")
    capabilities = Capabilities(atomic_write=True, exclusive_create=True)

    def check(self, path: str) -> None:
        endpoint = self.fs.endpoint_url or self.fs.client_kwargs.get("endpoint_url")
        check_reachable(endpoint, "endpoint_url")

    def create_exclusive(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise FileExistsError(f"{self.url(path)} already exists") from None
        finally:
            self.fs.invalidate_cache(path)
