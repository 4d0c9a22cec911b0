"""The accounting of one load: rows and amount read, kept, dropped by reason, lines merged.

Every loader fills one :class:`LoadReport`; the command line prints :meth:`LoadReport.line`
and training logs :meth:`LoadReport.as_metrics` to MLflow, so nothing leaves the input
without a number beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

#: Key of ``DataFrame.attrs`` holding a loaded table's report, as a plain dict: pandas writes
#: attrs into Parquet metadata as JSON.
ATTRS_KEY = "load_report"


@dataclass(frozen=True)
class Dropped:
    """Rows removed for one reason, and their summed amount (transactions only).

    ``key`` is a short name for metrics (``duplicates``, ``missing_ids``); ``reason`` says it
    in words.
    """

    key: str
    reason: str
    rows: int
    amount: float | None = None


@dataclass(frozen=True)
class LoadReport:
    """What one load read, kept and dropped.

    Attributes
    ----------
    table
        ``transactions`` or ``interactions``, with the file name when there is one.
    rows_read
        Rows in the source.
    rows_kept
        Rows out (after merging order lines: one row per order).
    dropped
        Removals by reason.
    amount_read, amount_kept
        Summed amounts in and out (transactions); None for interactions.
    lines_merged
        Source lines that became part of another line's order (lines - orders).
    duplicates_kept
        Rows identical to an earlier one in every source column, kept on request.
    currency
        The data's currency code, when stated.
    """

    table: str
    rows_read: int
    rows_kept: int
    dropped: tuple[Dropped, ...] = ()
    amount_read: float | None = None
    amount_kept: float | None = None
    lines_merged: int = 0
    duplicates_kept: int = 0
    currency: str | None = field(default=None, compare=False)

    def rows_dropped(self, key: str) -> int:
        """Rows dropped for the reason ``key`` (0 when none)."""
        return sum(d.rows for d in self.dropped if d.key == key)

    def _money(self, value: float | None) -> str:
        text = f"{value:,.2f}" if value is not None else "n/a"
        return f"{text} {self.currency}" if self.currency else text

    def line(self) -> str:
        """One line of accounting, e.g. for the command line."""
        parts = [f"{self.table}: {self.rows_read:,} rows read, {self.rows_kept:,} kept"]
        if self.lines_merged:
            parts[0] += f" as orders ({self.lines_merged:,} lines merged into their order)"
        for drop in self.dropped:
            amount = f" (amount {self._money(drop.amount)})" if drop.amount is not None else ""
            parts.append(f"{drop.rows:,} dropped: {drop.reason}{amount}")
        if self.duplicates_kept:
            parts.append(f"{self.duplicates_kept:,} exact duplicate rows kept")
        if self.amount_read is not None:
            parts.append(
                f"amount read {self._money(self.amount_read)}, kept {self._money(self.amount_kept)}"
            )
        return "; ".join(parts)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Numeric fields as flat metrics, e.g. ``tx_rows_read``, ``tx_dropped_duplicates``."""
        out: dict[str, float] = {
            f"{prefix}_rows_read": float(self.rows_read),
            f"{prefix}_rows_kept": float(self.rows_kept),
            f"{prefix}_lines_merged": float(self.lines_merged),
        }
        for drop in self.dropped:
            out[f"{prefix}_dropped_{drop.key}"] = float(drop.rows)
            if drop.amount is not None:
                out[f"{prefix}_dropped_{drop.key}_amount"] = float(drop.amount)
        if self.amount_read is not None and self.amount_kept is not None:
            out[f"{prefix}_amount_read"] = float(self.amount_read)
            out[f"{prefix}_amount_kept"] = float(self.amount_kept)
        return out

    def to_attrs(self) -> dict[str, Any]:
        """The report as JSON-ready data for ``DataFrame.attrs``."""
        return asdict(self)

    @classmethod
    def of(cls, frame: pd.DataFrame) -> LoadReport | None:
        """The report a loader left on ``frame``, or None for a frame no loader made."""
        data = frame.attrs.get(ATTRS_KEY)
        return cls.from_attrs(data) if isinstance(data, dict) else None

    @classmethod
    def from_attrs(cls, data: dict[str, Any]) -> LoadReport:
        """The report from :meth:`to_attrs`' data."""
        dropped = tuple(Dropped(**d) for d in data.get("dropped", ()))
        return cls(**{**data, "dropped": dropped})
