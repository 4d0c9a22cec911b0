"""The error every loader raises on input that breaks Rapport's contract."""

from __future__ import annotations

import pandas as pd

#: How many offending rows an error message shows.
SHOWN_ROWS = 5


class DataValidationError(ValueError):
    """Input data break the contract; the message names the table, column and first rows."""

    def __init__(
        self,
        table: str,
        column: str | None,
        problem: str,
        rows: pd.DataFrame | None = None,
    ) -> None:
        self.table = table
        self.column = column
        self.problem = problem
        self.rows = rows
        where = f"{table}: column '{column}'" if column else table
        message = f"{where}: {problem}"
        if rows is not None and len(rows):
            shown = rows.head(SHOWN_ROWS)
            message += (
                f"\nfirst offending rows ({len(shown)} of {len(rows):,}, "
                f"index is the row number in the input):\n{shown.to_string()}"
            )
        super().__init__(message)
