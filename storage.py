"""Where a run's files live: a local folder or an object store (``s3://bucket/prefix``), through one interface.

Remote paths go through ``pyarrow.fs``, the filesystem layer Ray Train itself uses, so checkpoints that Ray uploads
and the logs we upload land side by side. S3 credentials and endpoint come only from the standard AWS environment
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, and
``AWS_ENDPOINT_URL`` for S3-compatible stores such as MinIO), never from flags or files.

A checkpoint can be named in any of the ways a run leaves one behind (``fetch_checkpoint``): a ``.ckpt`` file, a
local run folder (its ``checkpoints/last.ckpt``), a Ray Train checkpoint folder (``checkpoint_<time>/``, holding
``checkpoint.ckpt``), or a Ray run folder (its newest ``checkpoint_*``), each local or on S3.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from secrets_guard import excerpt

CKPT_NAME = "checkpoint.ckpt"  # the Lightning checkpoint inside each Ray Train checkpoint folder


class StorageError(OSError):
    """A path that cannot be read or written; the message names it."""


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """``base``/``parts``, for local paths and URIs alike."""
    return "/".join([str(base).rstrip("/"), *parts])


def _fs(uri: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises several types for a bad URI or missing credentials
        raise StorageError(f"{uri}: cannot open this storage location ({exc})") from exc


def kind(uri: str) -> str | None:
    """'file', 'dir', or None when nothing is at ``uri``."""
    import pyarrow.fs

    if not is_remote(uri):
        p = Path(uri)
        return "file" if p.is_file() else "dir" if p.is_dir() else None
    fs, path = _fs(uri)
    info = fs.get_file_info(path)
    return {pyarrow.fs.FileType.File: "file", pyarrow.fs.FileType.Directory: "dir"}.get(info.type)


def listdir(uri: str) -> list[str]:
    """Names directly under the folder ``uri`` (empty if it does not exist)."""
    import pyarrow.fs

    if not is_remote(uri):
        return sorted(p.name for p in Path(uri).iterdir()) if Path(uri).is_dir() else []
    fs, path = _fs(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def upload(local: Path, uri: str) -> None:
    """Copy the file or folder ``local`` to ``uri`` (files already there with other names are kept)."""
    import pyarrow.fs

    if not is_remote(uri):
        if Path(uri).resolve() != local.resolve():
            (shutil.copytree(local, uri, dirs_exist_ok=True) if local.is_dir() else shutil.copy2(local, uri))
        return
    fs, path = _fs(uri)
    if local.is_dir():
        fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def download(uri: str, local: Path) -> Path:
    """Copy the file or folder at ``uri`` to ``local``; returns ``local``."""
    import pyarrow.fs

    found = kind(uri)
    if found is None:
        raise StorageError(f"{uri}: nothing there")
    local.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(uri):
        (shutil.copytree(uri, local, dirs_exist_ok=True) if found == "dir" else shutil.copy2(uri, local))
        return local
    fs, path = _fs(uri)
    if found == "dir":
        local.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def remove(uri: str) -> None:
    """Delete the file or folder at ``uri``, local or remote (nothing there: nothing to do)."""
    found = kind(uri)
    if found is None:
        return
    if not is_remote(uri):
        shutil.rmtree(uri) if found == "dir" else Path(uri).unlink()
        return
    fs, path = _fs(uri)
    fs.delete_dir(path) if found == "dir" else fs.delete_file(path)


def latest_ray_checkpoint(run_uri: str) -> str | None:
    """The newest ``checkpoint_*`` folder of a Ray Train run folder (their names sort by time), or None."""
    names = [n for n in listdir(run_uri) if n.startswith("checkpoint_") and not n.endswith(".json")]
    return join(run_uri, names[-1]) if names else None


def fetch_checkpoint(path: str, workdir: Path) -> Path:
    """The local Lightning checkpoint that ``path`` names (see the module docstring), downloaded into ``workdir``
    when remote. A Lightning checkpoint can itself be a folder (FSDP's sharded layout)."""
    candidates = [path, join(path, CKPT_NAME), join(path, "last.ckpt"), join(path, "checkpoints", "last.ckpt")]
    latest = latest_ray_checkpoint(path) if kind(path) == "dir" else None
    if latest:
        candidates.append(join(latest, CKPT_NAME))
    for candidate in candidates:
        found = kind(candidate)
        if found == "file" or (found == "dir" and candidate.rstrip("/").endswith(".ckpt")):
            if not is_remote(candidate):
                return Path(candidate).resolve()  # a link such as last.ckpt resolves to its checkpoint
            return download(candidate, workdir / Path(candidate.rstrip("/")).name)
    raise StorageError(f"{path}: no checkpoint there (looked for a .ckpt, {CKPT_NAME}, last.ckpt, checkpoints/last.ckpt "
                       "and the newest checkpoint_* of a Ray run)")


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """The dict of a Lightning checkpoint file, on the CPU. With ``mmap`` the tensors stay on disk: a check that the
    file is whole and readable, at little cost, before a run loads its data and model.

    Raises:
        StorageError: ``path`` is truncated (a copy or a save cut short), corrupt or not a checkpoint; the message
            names it.
    """
    import pickle
    import zipfile

    import torch

    # torch.save writes a zip archive whose directory is at its end: a truncated file has none.
    if not zipfile.is_zipfile(path):
        raise StorageError(f"{path}: truncated or not a PyTorch checkpoint (no zip directory at its end): use an "
                           "earlier checkpoint of the run, or copy this one again")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        reason = excerpt(" ".join(str(exc).split()), 200)
        raise StorageError(f"{path}: a corrupt checkpoint ({type(exc).__name__}: {reason}): "
                           "use an earlier checkpoint of the run, or copy this one again") from None
    if not isinstance(checkpoint, dict):
        raise StorageError(f"{path}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    return checkpoint
