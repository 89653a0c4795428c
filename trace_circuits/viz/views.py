"""circuitsvis views side by side: render in Jupyter, ``.local_src`` is offline HTML."""

from __future__ import annotations


class PairView:
    """Two circuitsvis attention views side by side; renders in Jupyter, ``.local_src`` is offline HTML."""

    def __init__(self, parts: list[tuple[str, object]]):
        self.parts = parts

    @property
    def local_src(self) -> str:
        return "".join(f"<h3>{title}</h3>{view.local_src}" for title, view in self.parts)

    def _repr_html_(self) -> str:
        return "".join(f"<h3>{title}</h3>{view._repr_html_()}" for title, view in self.parts)
