"""Batch scoring: every customer in the data, as of a date, to Parquet (and a table).

Features stream out of DuckDB in chunks (:func:`rapport.features.build.stream_features`), each
chunk is scored with the compiled models and appended to the output, so memory follows the
chunk size rather than the number of customers. Outputs appear only when complete: the
Parquet file is renamed into place, the table is swapped in one transaction.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rapport.features.build import connect, stream_features, write_features
from rapport.features.contracts import TableSource
from rapport.serving.scoring import Scorer

#: Columns of the output, in order.
OUTPUT_COLUMNS = (
    "customer_id",
    "as_of",
    "churn_probability",
    "risk_tier",
    "predicted_value",
    "p_alive",
    "expected_purchases",
    "expected_days_to_next_purchase",
    "expected_next_purchase_date",
    "segment",
    "currency",
    "churn_model",
    "clv_model",
)


@dataclass(frozen=True)
class BatchResult:
    """What a batch run wrote."""

    rows: int
    chunks: int
    seconds: float
    out: Path
    table: str | None


def score_chunks(
    transactions: TableSource,
    interactions: TableSource | None,
    *,
    as_of: dt.date,
    scorer: Scorer,
    chunk_rows: int = 200_000,
    validate: bool = True,
    duckdb_threads: int | None = None,
    duckdb_memory_limit: str | None = None,
    currency: str | None = None,
) -> Iterator[pd.DataFrame]:
    """Scores of every customer with a purchase by ``as_of``, chunk by chunk.

    Parameters
    ----------
    transactions, interactions
        The event tables (paths or frames; see :mod:`rapport.features.contracts`).
    as_of
        The cutoff: features use events up to the end of that day.
    scorer
        The loaded churn and value models.
    chunk_rows
        Customers per chunk.
    currency
        The currency of ``transactions``' amounts; it must be the models' own.

    Yields
    ------
    pandas.DataFrame
        :data:`OUTPUT_COLUMNS`: ``customer_id``, ``as_of``, ``churn_probability``,
        ``risk_tier``, ``predicted_value`` (over the value horizon), ``p_alive``,
        ``expected_purchases``, ``expected_days_to_next_purchase``,
        ``expected_next_purchase_date``, ``segment``, ``currency`` (of ``predicted_value``;
        null when neither the data nor the models state one) and the model versions used.

    Raises
    ------
    ValueError
        When ``currency`` is not the currency the models were trained on.
    """
    currency = _currency(currency, scorer.currency)
    con = connect(threads=duckdb_threads, memory_limit=duckdb_memory_limit)
    try:
        for features in stream_features(
            transactions,
            interactions,
            as_of=as_of,
            windows=scorer.windows,
            interaction_pairs=scorer.interaction_pairs,
            validate=validate,
            chunk_rows=chunk_rows,
            connection=con,
        ):
            scores = scorer.score_frame(features).frame()
            scores.insert(0, "as_of", features["as_of"].to_numpy())
            scores.insert(0, "customer_id", features["customer_id"].to_numpy())
            scores["segment"] = features["segment"].to_numpy()
            scores["churn_model"] = scorer.churn_version.label
            scores["clv_model"] = scorer.value_version.label
            scores["currency"] = pd.Series(currency, index=scores.index, dtype="string")
            yield scores[list(OUTPUT_COLUMNS)]
    finally:
        con.close()


def _currency(data: str | None, models: str | None) -> str | None:
    if data and models and data.upper() != models.upper():
        raise ValueError(
            f"currency: the data are in {data} but the models learnt from {models} amounts; "
            "score them with models trained on this currency"
        )
    return data or models


def score_batch(
    chunks: Iterator[pd.DataFrame],
    out: Path,
    *,
    database_url: str | None = None,
    table: str = "rapport_scores",
    progress: Callable[[int], None] | None = None,
) -> BatchResult:
    """Write scored chunks to Parquet (and a database table), all or nothing.

    Parameters
    ----------
    chunks
        From :func:`score_chunks`.
    out
        Parquet path; written to a temporary file and renamed when complete.
    database_url
        Optional SQLAlchemy URL (``postgresql+psycopg://...``, ``sqlite:///...``): the rows go
        to a staging table that replaces ``table`` in one transaction at the end.
    table
        Target table name.
    progress
        Called with the number of rows of each chunk written.
    """
    start = time.perf_counter()
    count = 0
    engine = None
    staging = f"{table}__staging"
    if database_url:
        import sqlalchemy as sa

        engine = sa.create_engine(database_url)

    def tee() -> Iterator[pd.DataFrame]:
        nonlocal count
        for i, chunk in enumerate(chunks):
            if engine is not None:
                with engine.begin() as conn:
                    chunk.to_sql(
                        staging,
                        conn,
                        if_exists="replace" if i == 0 else "append",
                        index=False,
                        chunksize=50_000,
                        method="multi",
                    )
            count += 1
            if progress is not None:
                progress(len(chunk))
            yield chunk

    try:
        rows, _ = write_features(tee(), out)
        if engine is not None:
            _swap_table(engine, staging, table)
    finally:
        if engine is not None:
            _drop(engine, staging)
            engine.dispose()
    return BatchResult(
        rows=rows,
        chunks=count,
        seconds=time.perf_counter() - start,
        out=out,
        table=table if engine is not None else None,
    )


def _swap_table(engine: object, staging: str, table: str) -> None:
    import sqlalchemy as sa

    assert isinstance(engine, sa.engine.Engine)
    prep = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {prep.quote(table)}"))
        conn.execute(sa.text(f"ALTER TABLE {prep.quote(staging)} RENAME TO {prep.quote(table)}"))


def _drop(engine: object, name: str) -> None:
    import sqlalchemy as sa

    assert isinstance(engine, sa.engine.Engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"DROP TABLE IF EXISTS {engine.dialect.identifier_preparer.quote(name)}")
        )
