"""Typed reads of a hook set operation's JSON fields: each failure is one line naming the field and the fix."""

from __future__ import annotations

import math

from trace_circuits.errors import TraceCircuitsError

#: marks a field with no default: a missing one is an error
REQUIRED = object()


class FieldReader:
    """Typed reads of an operation's JSON fields, each failure one line naming the field."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def bad(self, key: str, want: str):
        return TraceCircuitsError(f"{self.where}: field '{key}' must be {want}, got {self.d.get(key)!r}; fix or "
                                  "re-export the hook set")

    def _get(self, key, default):
        if key not in self.d:
            if default is REQUIRED:
                raise TraceCircuitsError(f"{self.where}: field '{key}' is missing; re-export the hook set")
            return default
        return self.d[key]

    def int(self, key, default=None):
        v = self._get(key, REQUIRED if default is None else default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.bad(key, "an integer")
        return v

    def num(self, key, default, optional: bool = False):
        v = self._get(key, default)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (math.isnan(v)):
            raise self.bad(key, "a number")
        return float(v)

    def bool(self, key, default):
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self.bad(key, "true or false")
        return v

    def str(self, key, default):
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self.bad(key, "a string")
        return v

    def ints(self, key, default=None):
        v = self._get(key, REQUIRED if default is None else default)
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise self.bad(key, "a list of integers")
        return list(v)

    def nums(self, key, default):
        v = self._get(key, default)
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
            raise self.bad(key, "a list of numbers")
        return [float(x) for x in v]
