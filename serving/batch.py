"""Batch scoring: every customer in the data, as of a date, to Parquet (and a table).

Features stream out of DuckDB in chunks (:func:`rapport.features.build.stream_features`), each
chunk is scored with the compiled models and appended to the output, so memory follows the
chunk size rather than the number of customers. Outputs appear only when complete: the
Parquet file is written to a temporary file renamed into place, the table is loaded into a
staging table swapped in one transaction (:mod:`rapport.serving.db_output`).

A run killed mid-write leaves its temporary file (``.{out}.{host}.{pid}.{tag}.tmp``) and
staging table; the next run to the same output removes them. A temporary file is a
leftover when its process is gone from this host (the name says which), or, when another
host wrote it, once nothing has touched it for :data:`STALE_AFTER` (a live run writes to
it with every chunk).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rapport.features.build import connect, stream_features, stream_parquet
from rapport.features.contracts import TableSource
from rapport.serving.db_output import ColumnKind, TableOutput, pid_alive
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

#: Column types of the score table in a database.
OUTPUT_TYPES: dict[str, ColumnKind] = {
    "customer_id": "text",
    "as_of": "date",
    "churn_probability": "double",
    "risk_tier": "text",
    "predicted_value": "double",
    "p_alive": "double",
    "expected_purchases": "double",
    "expected_days_to_next_purchase": "double",
    "expected_next_purchase_date": "date",
    "segment": "text",
    "currency": "text",
    "churn_model": "text",
    "clv_model": "text",
}

#: A temporary Parquet file from another host (or an earlier version, whose names carry no
#: process id) is a leftover once untouched this long.
STALE_AFTER = dt.timedelta(hours=24)

# Host names go into file names, so only letters, digits and dashes are kept.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


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
    chunks: Iterable[pd.DataFrame],
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
        Parquet path; written to a temporary file and renamed when complete (after the
        table, when there is one, is swapped in).
    database_url
        Optional SQLAlchemy URL (``postgresql+psycopg://...``, ``sqlite:///...``): the rows go
        to a staging table unique to the run that replaces ``table`` in one transaction at
        the end (see :class:`rapport.serving.db_output.TableOutput`).
    table
        Target table name.
    progress
        Called with the number of rows of each chunk written.

    Raises
    ------
    rapport.serving.db_output.DatabaseOutputError
        When the database refuses the rows (one line naming the table and the database).
    """
    start = time.perf_counter()
    remove_stale_parts(out)
    count = 0
    tmp = out.with_name(f".{out.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with ExitStack() as stack:
        stack.callback(tmp.unlink, missing_ok=True)
        db = None
        if database_url:
            db = stack.enter_context(TableOutput(database_url, table, types=OUTPUT_TYPES))

        def tee() -> Iterator[pd.DataFrame]:
            nonlocal count
            for chunk in chunks:
                if db is not None:
                    db.append(chunk)
                count += 1
                if progress is not None:
                    progress(len(chunk))
                yield chunk

        rows, _ = stream_parquet(
            tee(), tmp, empty="no scores to write: no customer has a purchase by the cutoff"
        )
        if db is not None:
            db.swap()
        os.replace(tmp, out)
    return BatchResult(
        rows=rows,
        chunks=count,
        seconds=time.perf_counter() - start,
        out=out,
        table=table if database_url else None,
    )


def remove_stale_parts(out: Path, *, now: float | None = None) -> list[Path]:
    """Remove temporary files of ``out`` left by runs that are gone; the files removed.

    A file named for this host is a leftover when its process is not alive; any other
    (another host's, or an unnamed one of an earlier version) when untouched for
    :data:`STALE_AFTER`.
    """
    named = re.compile(
        rf"\.{re.escape(out.name)}\."
        r"(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}|[0-9a-f]{32})\.tmp"
    )
    now = time.time() if now is None else now
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        found = named.fullmatch(path.name)
        if found is None:
            continue
        if found["host"] == _HOST:
            pid = int(found["pid"])
            stale = pid != os.getpid() and not pid_alive(pid)
        else:
            try:
                stale = now - path.stat().st_mtime > STALE_AFTER.total_seconds()
            except FileNotFoundError:  # removed meanwhile by another run
                continue
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
