"""The same feature definitions on Spark, for data that outgrow one machine.

:func:`build_features_spark` runs the very SQL that :func:`rapport.features.build.build_features`
runs on DuckDB (:mod:`rapport.features.definitions`), transpiled to Spark SQL by sqlglot: one
definition of every feature, two engines. The tests check that both give the same values.

Needs the ``spark`` extra (``pip install 'rapport[spark]'``: PySpark 4, and Java 17 or later).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rapport.features import definitions as defs
from rapport.features.build import CutoffsLike, parse_cutoffs
from rapport.features.contracts import SCHEMAS, DataValidationError, TableKind

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

#: The relations the feature SQL reads, passed to ``spark.sql`` as DataFrame arguments.
_RELATIONS = ("tx", "ix", "cutoffs")


def _check_columns(frame: DataFrame, kind: TableKind) -> None:
    missing = [c for c in SCHEMAS[kind].required if c not in frame.columns]
    if missing:
        raise DataValidationError(
            kind,
            missing[0],
            f"required column missing; columns present are {list(frame.columns)}",
        )


@contextlib.contextmanager
def _utc(spark: SparkSession) -> Iterator[None]:
    """The session time zone set to UTC for one query, then put back.

    Casting a timestamp to a date follows the session time zone; Rapport's event times are
    UTC, as on DuckDB, where every connection is set to UTC.
    """
    key = "spark.sql.session.timeZone"
    before = spark.conf.get(key)
    spark.conf.set(key, "UTC")
    try:
        yield
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)


def spark_sql(spec: defs.FeatureSpec) -> str:
    """The feature query in Spark SQL, its input relations as ``{tx}``, ``{ix}``, ``{cutoffs}``.

    The placeholders are what ``SparkSession.sql(query, **frames)`` fills with DataFrames: no
    temporary view of the caller's session is created or replaced.
    """
    sql = defs.transpile(defs.features_sql(spec), "spark")
    if "{" in sql or "}" in sql:  # pragma: no cover - the definitions never emit braces
        raise ValueError("the transpiled feature SQL contains braces")
    names = "|".join(_RELATIONS)
    return re.sub(rf"\b(FROM|JOIN)\s+({names})\b", r"\1 {\2}", sql)


def build_features_spark(
    spark: SparkSession,
    transactions: DataFrame,
    interactions: DataFrame | None = None,
    *,
    as_of: CutoffsLike,
    windows: Sequence[int] = defs.DEFAULT_WINDOWS,
    interaction_pairs: Sequence[tuple[str, str]] | None = None,
) -> DataFrame:
    """Point-in-time features per customer and cutoff, computed by Spark.

    Parameters
    ----------
    spark
        The session to run in. Its time zone is set to UTC while the query is planned and
        put back afterwards; nothing else of the session changes.
    transactions
        Spark DataFrame with ``customer_id``, ``timestamp`` (UTC) and ``amount``, already in
        the contract (:mod:`rapport.features.contracts`): Spark data are validated where
        they are produced.
    interactions
        Optional Spark DataFrame with ``customer_id``, ``timestamp``, ``channel`` and
        ``event`` (lower-cased here).
    as_of, windows, interaction_pairs
        As for :func:`rapport.features.build.build_features`; the pairs are discovered from
        ``interactions`` (one distinct query) unless pinned.

    Returns
    -------
    pyspark.sql.DataFrame
        The columns of :func:`rapport.features.definitions.feature_columns`, with the values
        ``build_features`` gives (``segment`` and ``preferred_channel`` as strings), ordered
        by ``as_of`` then ``customer_id``. Lazy: write it out or collect it as needed.
    """
    from pyspark.sql import functions as sf

    _check_columns(transactions, "transactions")
    tx = transactions.select(
        "customer_id",
        sf.col("timestamp").cast("timestamp").alias("timestamp"),
        sf.col("amount").cast("double").alias("amount"),
    )
    ix = None
    pairs: Sequence[tuple[str, str]] = ()
    if interactions is not None:
        _check_columns(interactions, "interactions")
        ix = interactions.select(
            "customer_id",
            sf.col("timestamp").cast("timestamp").alias("timestamp"),
            sf.lower(sf.trim(sf.col("channel"))).alias("channel"),
            sf.lower(sf.trim(sf.col("event"))).alias("event"),
        )
        if interaction_pairs is None:
            rows = ix.select("channel", "event").distinct().collect()
            pairs = defs.discover_pairs([(r["channel"], r["event"]) for r in rows])
        else:
            pairs = interaction_pairs
    spec = defs.FeatureSpec(windows=tuple(windows), interaction_pairs=tuple(pairs))
    dates = parse_cutoffs(as_of)
    cutoffs = spark.createDataFrame([(d,) for d in dates], "as_of DATE")
    frames: dict[str, Any] = {"tx": tx, "cutoffs": cutoffs}
    if spec.interaction_pairs and ix is not None:
        frames["ix"] = ix
    with _utc(spark):
        # DataFrames passed by keyword fill the {name} placeholders (no temporary views)
        out = spark.sql(spark_sql(spec), args=None, **frames)
    return out.select(*defs.feature_columns(spec))
