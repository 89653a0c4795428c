"""Atomic writes: a file is written to a temporary name in the same folder, flushed to disk, then renamed over the
target; a folder (hook set, SAE, model cache entry) is built beside its target, every file in it flushed, then
renamed into place, and an old folder there is only removed once the new one is in place (:func:`replace_dir`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (renames into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder``, then the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is flushed and renamed onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def staging_dir(dest: str | os.PathLike) -> Path:
    """An empty folder beside ``dest`` to build its replacement in (pass it to :func:`replace_dir`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
    return tmp


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def leftover_dirs(dest: str | os.PathLike) -> list[Path]:
    """Folders an interrupted :func:`replace_dir` of ``dest`` left beside it: the old version (``.NAME.*.old``)."""
    dest = Path(dest)
    return sorted(dest.parent.glob(f".{dest.name}.*.old")) if dest.parent.is_dir() else []


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` (from :func:`staging_dir`) to ``dest``: every file flushed to disk first, then
    renamed into place. An existing ``dest`` is moved aside and removed only once the new one is in place, so a crash
    leaves either the old folder at ``dest`` or, beside it, the old one as ``.NAME.*.old`` (see :func:`leftover_dirs`),
    never nothing. On failure ``tmp`` is removed and the old folder stays."""
    tmp, dest = Path(tmp), Path(dest)
    try:
        fsync_tree(tmp)
        old = None
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old)  # an empty folder is replaced in one step
        try:
            os.replace(tmp, dest)
        except OSError:
            if old is not None:
                os.replace(old, dest)  # put the old one back
            raise
        fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def check_output(path: str | os.PathLike, kind: str = "dir") -> Path:
    """Check, before any work, that ``path`` can be written as a folder (``kind="dir"``) or a file: not a file where a
    folder is wanted (or the reverse), no file among its parents, and writable. Missing parent folders are created.
    One error line otherwise."""
    from trace_circuits.errors import TraceCircuitsError

    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise TraceCircuitsError(f"--out {path} is a file; pass a folder (it is created if missing)")
    if kind == "file" and path.is_dir():
        raise TraceCircuitsError(f"--out {path} is a folder; pass a file name such as {path / 'responses.jsonl'}")
    if kind == "file" and path.exists() and not os.access(path, os.W_OK):
        raise TraceCircuitsError(f"cannot write to {path} (no write permission); pick another --out or fix its "
                                 "permissions")
    folder = path if kind == "dir" else path.parent
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TraceCircuitsError(f"cannot write to {path}: {existing} is a file, not a folder; pick another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise TraceCircuitsError(f"cannot write to {folder} ({err.strerror or type(err).__name__}); pick another --out "
                                 "or fix its permissions") from None
    return path
