"""What an initialisation changed: one :class:`InitRecord` per parameter, gathered in an :class:`InitReport`.

:func:`~stability_callbacks.init.init_swap` returns the report; ``str(report)`` is a table a person can
read, ``report.markdown()`` the same table for TensorBoard's text plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from stability_callbacks.lsuv import LSUVResult

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
        modified: whether the values changed (``False`` where the scheme left them as they were, e.g.
            weight 1 on a normalisation layer that already had it).
    """

    param: str
    layer: str
    shape: tuple[int, ...]
    scheme: str
    reason: str
    old_std: float
    new_std: float
    modified: bool = True

    @property
    def changed(self) -> bool:
        """Whether the parameter was re-initialised (a scheme other than ``kept`` changed its values)."""
        return self.scheme != "kept" and self.modified


@dataclass(frozen=True)
class InitReport:
    """The result of :func:`init_swap`: one :class:`InitRecord` per parameter, in module order.

    Attributes:
        records: the records.
        scheme: the scheme asked for.
        traced_by: how the following activations were found (``"fx"``, ``"hooks"``, ``"training step"``,
            ``"registration"``).
        lsuv: per-layer LSUV results where LSUV ran.
        lsuv_pending: layers whose LSUV measurement is still to come (``init_swap(defer_lsuv=True)``);
            :meth:`with_lsuv` fills it in.
    """

    records: tuple[InitRecord, ...]
    scheme: str
    traced_by: str
    lsuv: dict[str, LSUVResult] = field(default_factory=dict)
    lsuv_pending: tuple[str, ...] = ()

    def __getitem__(self, param: str) -> InitRecord:
        for r in self.records:
            if r.param == param:
                return r
        raise KeyError(param)

    @property
    def changed(self) -> list[InitRecord]:
        """Records of the parameters that were re-initialised."""
        return [r for r in self.records if r.changed]

    @property
    def modified(self) -> bool:
        """Whether any parameter's values changed."""
        return any(r.modified for r in self.records)

    def with_lsuv(self, results: Mapping[str, LSUVResult], new_stds: Mapping[str, float]) -> InitReport:
        """The report once LSUV has measured its layers: their reasons and new stds filled in.

        Args:
            results: ``{layer: LSUVResult}`` (:class:`~stability_callbacks.lsuv.LSUVPass`).
            new_stds: ``{parameter: std}`` of the parameters of those layers after LSUV.
        """
        records = tuple(
            replace(r, reason=lsuv_reason(results[r.layer]), new_std=new_stds.get(r.param, r.new_std))
            if r.scheme == "lsuv" and len(r.shape) >= 2 and r.layer in results
            else r
            for r in self.records
        )
        return replace(self, records=records, lsuv={**self.lsuv, **results}, lsuv_pending=())

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


def lsuv_reason(result: LSUVResult) -> str:
    """What LSUV did to a layer, in words."""
    if not result.called:
        return "LSUV: orthogonal only, the forward pass never reached this layer"
    return (
        f"orthogonal, then scaled to unit output std ({result.std_before:.3g} -> {result.std_after:.3g} in "
        f"{result.tries} tries)"
    )
