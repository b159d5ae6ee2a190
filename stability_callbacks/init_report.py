"""What an initialisation changed: one :class:`InitRecord` per parameter, gathered in an :class:`InitReport`.

:func:`~stability_callbacks.init.init_swap` returns the report; ``str(report)`` is a table a person can
read, ``report.markdown()`` the same table for TensorBoard's text plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stability_callbacks.init_schemes import LSUVResult

__all__ = ["InitRecord", "InitReport"]


@dataclass(frozen=True)
class InitRecord:
    """What :func:`init_swap` did to one parameter.

    Attributes:
        param: dotted parameter name.
        layer: dotted name of the module that owns it.
        shape: the parameter's shape.
        scheme: what was applied (``"he_normal"``, ``"zeros"``, ``"ones"``, ``"kept"``, ...).
        reason: why, in words (the activation that follows, the layer type, an override...).
        old_std: standard deviation before (population std, 0 for one element).
        new_std: standard deviation after.
    """

    param: str
    layer: str
    shape: tuple[int, ...]
    scheme: str
    reason: str
    old_std: float
    new_std: float

    @property
    def changed(self) -> bool:
        return self.scheme != "kept"


@dataclass(frozen=True)
class InitReport:
    """The result of :func:`init_swap`: one :class:`InitRecord` per parameter, in module order.

    Attributes:
        records: the records.
        scheme: the scheme asked for.
        traced_by: how the following activations were found (``"fx"``, ``"hooks"``, ``"registration"``).
        lsuv: per-layer LSUV results where LSUV ran.
    """

    records: tuple[InitRecord, ...]
    scheme: str
    traced_by: str
    lsuv: dict[str, LSUVResult] = field(default_factory=dict)

    def __getitem__(self, param: str) -> InitRecord:
        for r in self.records:
            if r.param == param:
                return r
        raise KeyError(param)

    @property
    def changed(self) -> list[InitRecord]:
        """Records of the parameters that were re-initialised."""
        return [r for r in self.records if r.changed]

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(r.param, f"{r.old_std:.4g}", r.scheme, f"{r.new_std:.4g}", r.reason) for r in self.records]

    def _title(self) -> str:
        return (
            f"init_swap(scheme={self.scheme!r}): {len(self.changed)} of {len(self.records)} parameters "
            f"re-initialised; activations found by {self.traced_by}"
        )

    def table(self) -> str:
        """A fixed-width table: parameter, old std, scheme, new std, reason."""
        head = ("parameter", "old std", "scheme", "new std", "why")
        rows = [head, *self._rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [self._title()]
        for k, row in enumerate(rows):
            cells = [row[i].ljust(widths[i]) for i in range(4)]
            lines.append("  ".join([*cells, row[4]]).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in [*widths, len(head[4])]))
        return "\n".join(lines)

    def markdown(self) -> str:
        """The same table in Markdown (TensorBoard's text plugin renders it)."""
        lines = [
            f"**{self._title()}**",
            "",
            "| parameter | old std | scheme | new std | why |",
            "|---|---:|---|---:|---|",
        ]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self._rows()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
