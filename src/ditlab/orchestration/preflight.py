"""Checks that touch the disk, run before Ray starts: the spec itself loads anywhere (config.py is
pure), but the folders and files it names must exist on this machine to run it."""

from __future__ import annotations

from ditlab.config import ExperimentSpec


class PreflightError(ValueError):
    """A spec that validates but cannot run here; the message names the field and the path."""


def preflight(spec: ExperimentSpec, task_checks: bool = True) -> None:
    """Dataset folder or prepared data present and readable, then (unless `task_checks` is False:
    `ditlab data prepare` needs the data alone) the task's own checks."""
    data = spec.data
    if data.format == "shards":
        check_shards(spec)
    elif data.prepared:
        from ditlab.data.prepared import PreparedDataError, check_prepared

        try:
            check_prepared(data, verify_checksums=True)
        except PreparedDataError as err:
            raise PreflightError(str(err)) from None
    elif data.source == "folder":
        from ditlab.data.folder import check_image_folder

        try:
            check_image_folder(data.path)
        except (OSError, ValueError) as err:
            raise PreflightError(f"data.path: {err}") from None
    if not task_checks:
        return
    from ditlab.training.tasks import task_class

    try:
        task_class(spec.task).preflight(spec)
    except ValueError as err:
        raise PreflightError(str(err)) from None


def check_shards(spec: ExperimentSpec) -> None:
    """The shard set fits the spec and every shard matches the manifest (data/shards.py: sizes
    always, sha256 once per shard version); streaming serves the tasks that train on the images."""
    from ditlab.data.shards import ShardError, check_shard_set
    from ditlab.storage import StorageError, check_storage, is_remote

    if is_remote(spec.data.path):  # a missing bucket or refused credentials, said as such
        try:
            check_storage("data.path", spec.data.path)
        except StorageError as err:
            raise PreflightError(str(err)) from None
    from ditlab.training.tasks import task_class

    if spec.data.stream and not task_class(spec.task).streams(spec):
        raise PreflightError(f"data.format: shards stream images to tasks that train on them; task {spec.task} "
                             "needs data.stream: false")
    try:
        check_shard_set(spec.data)
    except (ShardError, OSError) as err:
        raise PreflightError(str(err)) from None
