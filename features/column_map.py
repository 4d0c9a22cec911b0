"""Column maps: which of a user's columns, or which expression over them, is each contract column.

A map value is either a column of the source table (``customer_id=CustomerID``) or a SQL
expression over its columns, evaluated by DuckDB on load (``amount=Quantity*UnitPrice``,
``amount="Lineitem quantity" * "Lineitem price"``): line-level exports carry a quantity and
a unit price, never the amount itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import pandas as pd

#: Contract column names a map may assign (a comma only starts a new entry before one of them,
#: so expressions such as ``coalesce(a, b)`` keep their commas).
MAPPABLE = ("customer_id", "timestamp", "amount", "order_id", "channel", "event")

_ENTRY_START = re.compile(r",(?=\s*(?:" + "|".join(MAPPABLE) + r")\s*=)")
_PLAIN_NAME = re.compile(r"^[\w .\-/#]+$")


class ColumnMapError(ValueError):
    """A column map entry names no column, or its expression cannot be evaluated."""

    def __init__(self, target: str, problem: str) -> None:
        self.target = target
        super().__init__(problem)


def parse_column_map(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Parse a column map from Rapport's names to the user's columns or expressions.

    Parameters
    ----------
    spec
        ``{"customer_id": "CustomerID", "amount": "Quantity * UnitPrice"}`` or the CLI form
        ``"customer_id=CustomerID,amount=Quantity*UnitPrice"``; ``None`` or ``""`` for none.

    Returns
    -------
    dict
        Rapport column name -> column name or DuckDB expression over the user's columns.
    """
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        return dict(spec)
    mapping: dict[str, str] = {}
    for part in _ENTRY_START.split(spec):
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ValueError(
                f"column map entry {part!r} is not of the form rapport_name=your_column "
                "(or rapport_name=expression, e.g. amount=Quantity*UnitPrice)"
            )
        mapping[ours.strip()] = theirs.strip()
    return mapping


def is_expression(value: str, columns: pd.Index) -> bool:
    """Whether a map value is an expression rather than a (possibly absent) column name."""
    return value not in columns and not _PLAIN_NAME.match(value)


def evaluate_expressions(df: pd.DataFrame, expressions: Mapping[str, str]) -> pd.DataFrame:
    """Evaluate ``{target: expression}`` over ``df``'s columns with DuckDB, row for row.

    Returns
    -------
    pandas.DataFrame
        One column per target, on ``df``'s index.

    Raises
    ------
    ColumnMapError
        Naming the expression, DuckDB's reason and the columns present.
    """
    import duckdb

    con = duckdb.connect()
    try:
        # DuckDB keeps insertion order for a projection (preserve_insertion_order is on by
        # default), so the values line up with the source rows.
        con.register("source", df.reset_index(drop=True))
        out: dict[str, pd.Series] = {}
        for target, expression in expressions.items():
            try:
                values = con.execute(f"SELECT ({expression}) AS value FROM source").df()["value"]
            except duckdb.Error as err:
                reason = str(err).splitlines()[0]
                raise ColumnMapError(
                    target,
                    f"mapped to the expression {expression!r}, which cannot be evaluated "
                    f"({reason}); columns are {list(df.columns)}",
                ) from err
            if len(values) != len(df):
                raise ColumnMapError(
                    target,
                    f"the expression {expression!r} gives {len(values):,} values for "
                    f"{len(df):,} rows (an aggregate?); use a row-wise expression",
                )
            out[target] = pd.Series(values.to_numpy(), index=df.index, name=target)
        return pd.DataFrame(out, index=df.index)
    finally:
        con.close()
