"""Object storage (s3://) for run folders: `ditlab run --storage s3://BUCKET/PREFIX`.

Any S3 API works (AWS S3, GCS's S3 interoperability endpoint, MinIO): the endpoint, region and
credentials come from the standard variables AWS_ENDPOINT_URL, AWS_DEFAULT_REGION (or AWS_REGION),
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN; without keys pyarrow's default chain
(profile, instance role) is used. ditlab never prints, stores or logs them: they live in the
pyarrow filesystem object alone, which Ray Train hands to its controller and workers, so nodes
without the variables reach the bucket too.

A run folder on object storage is split in two. Ray Train writes the checkpoints there directly
(every worker, from any node). The driver's own files (spec.yaml, tracking.json, result.json,
metrics and figures) are written to a local staging folder, as for a local run, and copied to the
same s3:// folder as soon as the MLflow run is open and again when the command ends, however it
ends; a rerun with the same --name copies them back first, so it resumes into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SCHEME = "s3://"
# The driver's files a rerun needs back: the spec it compares, its MLflow run, reports not yet sent.
RESUME_FILES = ("spec.yaml", "tracking.json", "unsent_metrics.jsonl")


class StorageError(ValueError):
    """Object storage that cannot be used; the message names the URL (never a credential)."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(SCHEME)


def filesystem(url: str):
    """(pyarrow S3FileSystem, path inside it: "bucket/prefix") for an s3:// URL, configured from the
    standard AWS variables."""
    from pyarrow import fs

    env = os.environ
    options = {"region": env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1"}
    if env.get("AWS_ENDPOINT_URL"):
        options["endpoint_override"] = env["AWS_ENDPOINT_URL"]
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                       session_token=env.get("AWS_SESSION_TOKEN"))
    return fs.S3FileSystem(**options), url[len(SCHEME):].strip("/")


# Words of the S3 API (and of pyarrow's AWS SDK) for refused credentials.
DENIED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ACCESS_DENIED", "403", "Forbidden")


def check_storage(flag: str, url: str) -> None:
    """The bucket of `url` exists and the credentials may list it; otherwise a StorageError naming
    `flag` and the URL. Only the bucket and the prefix are read: nothing is written."""
    from pyarrow import fs

    bucket = url[len(SCHEME):].split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{flag}: {url!r} names no bucket; write s3://BUCKET/PREFIX")
    s3, path = filesystem(url)
    try:
        info = s3.get_file_info(bucket)
        if info.type != fs.FileType.NotFound:
            s3.get_file_info(fs.FileSelector(path, allow_not_found=True))  # listing: the permission a run needs
    except OSError as err:
        text = str(err)
        if any(word in text for word in DENIED):
            raise StorageError(f"{flag}: {url}: the credentials are refused (AWS_ACCESS_KEY_ID / "
                               "AWS_SECRET_ACCESS_KEY, or the profile or role in use)") from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        raise StorageError(f"{flag}: {url}: {endpoint} does not answer ({text.splitlines()[0][:200]})") from None
    if info.type == fs.FileType.NotFound:
        raise StorageError(f"{flag}: {url}: bucket {bucket!r} does not exist (or these credentials cannot see it)")


@dataclass
class RunFolder:
    """Where a run's files go. `local` is where the driver writes them; `location` is what
    results and the MLflow run name (the s3:// URL of a remote run folder, else `local`)."""

    local: Path
    location: str
    url: str | None = None  # the s3:// run folder, for a remote one

    def push(self) -> None:
        """Copy the driver's files (the staging folder's top level) to the s3:// run folder."""
        if self.url is None:
            return
        s3, path = filesystem(self.url)
        for file in sorted(p for p in self.local.iterdir() if p.is_file()):
            with s3.open_output_stream(f"{path}/{file.name}") as out:
                out.write(file.read_bytes())

    def pull(self) -> None:
        """Copy the files a rerun resumes from (RESUME_FILES) from the s3:// run folder, where present."""
        from pyarrow import fs

        s3, path = filesystem(self.url)
        for name in RESUME_FILES:
            if s3.get_file_info(f"{path}/{name}").type == fs.FileType.File:
                with s3.open_input_stream(f"{path}/{name}") as src:
                    (self.local / name).write_bytes(src.read())

    def clear(self) -> None:
        """Delete the run folder (checkpoints included): a run started over."""
        if self.url is not None:
            s3, path = filesystem(self.url)
            s3.delete_dir_contents(path, missing_dir_ok=True)
        shutil.rmtree(self.local, ignore_errors=True)

    def ray_storage(self) -> tuple[str, object | None]:
        """(storage_path, storage_filesystem) for Ray Train: the run folder's parent."""
        if self.url is None:
            return str(self.local.parent), None
        s3, path = filesystem(self.url)
        return path.rsplit("/", 1)[0], s3

    def checkpoint_location(self, name: str) -> str:
        return f"{self.location}/{name}"


@contextlib.contextmanager
def run_folder(storage: str | Path, run_name: str) -> Iterator[RunFolder]:
    """The run folder `run_name` inside `storage` (a local folder, or an s3:// URL: then a local
    staging folder, filled from the URL first and copied back to it at the end, however it ends)."""
    if not is_remote(storage):
        local = Path(storage).resolve() / run_name
        yield RunFolder(local, str(local))
        return
    url = f"{str(storage).rstrip('/')}/{run_name}"
    staging = Path(tempfile.mkdtemp(prefix="ditlab-run-")) / run_name
    staging.mkdir()
    folder = RunFolder(staging, url, url)
    try:
        folder.pull()
        yield folder
    finally:
        try:
            if folder.local.is_dir():
                folder.push()
        finally:
            shutil.rmtree(staging.parent, ignore_errors=True)
