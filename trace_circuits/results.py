"""What every result object shares: ``save(dir)`` / ``load(dir)``, ``to_json()`` / ``from_json()`` with one format
check, and ``plot()``.

A result folder holds ``<name>.json`` (with ``kind`` and ``format_version``), any tensors in safetensors, and, when
asked for, ``<name>.html`` rendered by :mod:`trace_circuits.viz` (rendering does not live in ``save``). Loading reads
JSON and safetensors only; nothing is unpickled. A file of another kind, or written by a newer trace-circuits, is one
error line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from trace_circuits._io import write_json_atomic
from trace_circuits.errors import TraceCircuitsError


def check_format(data: Any, kind: str, version: int, where: str, fix: str) -> dict:
    """``data`` if it is a ``kind`` JSON object of format ``version`` or older, else one error line naming ``fix``.

    Files written before ``kind`` was recorded carry no ``kind``; they are accepted when the version fits."""
    if not isinstance(data, dict):
        raise TraceCircuitsError(f"{where} is not a {kind} (not a JSON object); {fix}")
    found = data.get("kind")
    if found is not None and found != kind:
        raise TraceCircuitsError(f"{where} is a {found}, not a {kind}; {fix}")
    v = data.get("format_version", 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise TraceCircuitsError(f"{where} has format version {v!r}, not a non-negative integer; {fix}")
    if v > version:
        raise TraceCircuitsError(f"{where} has format version {v}, newer than this trace-circuits reads ({version}); "
                                 "upgrade trace-circuits")
    return data


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (``json`` would silently keep the last value)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(f"key '{k}' appears twice in one object")
        out[k] = v
    return out


def loads_json(text: str) -> Any:
    """``json.loads`` that refuses an object naming a key twice (:class:`DuplicateKeyError`)."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


def read_json(path: Path, kind: str, fix: str) -> dict:
    """A JSON file, with one error line if it is missing, not UTF-8 JSON, or names a key twice in one object."""
    try:
        return loads_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceCircuitsError(f"{path} does not exist; {fix}") from None
    except IsADirectoryError:
        raise TraceCircuitsError(f"{path} is a folder, not a {kind} file; {fix}") from None
    except DuplicateKeyError as err:
        raise TraceCircuitsError(f"{path}: {err} (which one counts is ambiguous); {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise TraceCircuitsError(f"{path} is not a readable {kind} ({type(err).__name__}: {str(err)[:80]}); {fix}") \
            from None


class Result:
    """Mixin for result objects. Subclasses set ``KIND``, ``FORMAT_VERSION``, ``FILE`` (e.g. ``divergence.json``)
    and ``FIX`` (how to make a new one), and implement ``_to_dict`` / ``_from_dict``; tensors or extra files go
    through ``_save_extra`` / ``_load_extra``."""

    KIND: ClassVar[str] = ""
    FORMAT_VERSION: ClassVar[int] = 1
    FILE: ClassVar[str] = ""
    FIX: ClassVar[str] = "run trace-circuits again to write a new one"

    # -- to implement ---------------------------------------------------------------------------------------

    def _to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def _from_dict(cls, data: dict):
        raise NotImplementedError

    def _save_extra(self, folder: Path) -> dict[str, Path]:
        return {}

    def _load_extra(self, folder: Path) -> None:
        return None

    # -- shared ---------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"kind": self.KIND, "format_version": self.FORMAT_VERSION, **self._to_dict()}

    @classmethod
    def from_json(cls, data: dict, where: str = ""):
        check_format(data, cls.KIND, cls.FORMAT_VERSION, where or cls.FILE, cls.FIX)
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise TraceCircuitsError(f"{where or cls.FILE} is not a complete {cls.KIND} ({type(err).__name__}: "
                                     f"{str(err)[:80]}); {cls.FIX}") from None

    def save(self, out_dir: str | Path, html: bool = True, **html_kwargs) -> dict[str, Path]:
        """Write ``FILE`` (+ tensors) into ``out_dir``, and the HTML page unless ``html=False``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": write_json_atomic(out / self.FILE, self.to_json())}
        paths.update(self._save_extra(out))
        if html:
            from trace_circuits.viz.pages import write_page

            paths["html"] = write_page(self, out, **html_kwargs)
        return paths

    @classmethod
    def load(cls, path: str | Path):
        """Read a folder written by :meth:`save` (or the JSON file itself)."""
        p = Path(path)
        folder, file = (p, p / cls.FILE) if p.is_dir() or not p.suffix else (p.parent, p)
        obj = cls.from_json(read_json(file, cls.KIND, cls.FIX), where=str(file))
        obj._load_extra(folder)
        return obj

    def plot(self, **kwargs):
        """The result's figure (plotly; renders in Jupyter). See :mod:`trace_circuits.viz`."""
        from trace_circuits.viz import plot

        return plot(self, **kwargs)
