"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``dest`` in one rename; an old ``dest`` is moved aside first and deleted
    only once the new one is in place (an interruption leaves the old or the new folder, never neither). Every file
    in ``tmp`` is flushed to disk before the rename."""
    import shutil

    tmp, dest = Path(tmp), Path(dest)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = dest.with_name(dest.name + f".old{os.getpid()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def check_output(path: str | os.PathLike, kind: str = "dir") -> Path:
    """Check, before any work, that ``path`` can be written as a folder (``kind="dir"``) or a file: not a file where a
    folder is wanted (or the reverse), and writable. Missing parent folders are created. One error line otherwise."""
    from trace_circuits.errors import TraceCircuitsError

    path = Path(path)
    if kind == "dir" and path.is_file():
        raise TraceCircuitsError(f"--out {path} is a file; pass a folder (it is created if missing)")
    if kind == "file" and path.is_dir():
        raise TraceCircuitsError(f"--out {path} is a folder; pass a file name such as {path / 'responses.jsonl'}")
    folder = path if kind == "dir" else path.parent
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TraceCircuitsError(f"cannot write to {path}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise TraceCircuitsError(f"cannot write to {folder} ({err.strerror or type(err).__name__}); pick another --out "
                                 "or fix its permissions") from None
    return path
