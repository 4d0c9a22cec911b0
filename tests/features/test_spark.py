"""The feature definitions on a real (local) Spark give DuckDB's values, column for column."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from rapport.features.build import build_features
from rapport.features.contracts import validate_table
from rapport.features.synthetic import SyntheticConfig, generate_synthetic

pyspark = pytest.importorskip("pyspark", reason="the spark extra is not installed")
if shutil.which("java") is None:  # pragma: no cover - CI machines have Java
    pytest.skip("Spark needs Java", allow_module_level=True)

from rapport.features.spark import build_features_spark  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from test_pandas_reference import differences  # noqa: E402


@pytest.fixture(scope="module")
def spark() -> Iterator[pyspark.sql.SparkSession]:
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("rapport-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def world() -> tuple[pd.DataFrame, pd.DataFrame]:
    tx, ix = generate_synthetic(SyntheticConfig(n_customers=300, seed=3))
    return validate_table(tx, "transactions"), validate_table(ix, "interactions")


def _spark_frames(spark, tx: pd.DataFrame, ix: pd.DataFrame):
    # created while the session is on UTC: naive times are read as UTC instants
    stx = spark.createDataFrame(tx[["customer_id", "timestamp", "amount"]])
    labels = ix[["customer_id", "timestamp", "channel", "event"]].astype(
        {"channel": str, "event": str}
    )
    # mixed case on purpose: Spark input is lower-cased like the pandas loaders do
    labels["channel"] = labels["channel"].str.upper()
    return stx, spark.createDataFrame(labels)


def _as_duckdb_types(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["as_of"] = pd.to_datetime(out["as_of"]).astype("datetime64[us]")
    return out


def test_spark_equals_duckdb_on_every_column(spark, world) -> None:
    tx, ix = world
    cutoffs = "2025-03-31,2025-06-30"
    ours = build_features(tx, ix, as_of=cutoffs)
    stx, six = _spark_frames(spark, tx, ix)
    # a session in another time zone: dates of events near midnight would move
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")
    try:
        theirs = build_features_spark(spark, stx, six, as_of=cutoffs).toPandas()
        assert spark.conf.get("spark.sql.session.timeZone") == "America/New_York"
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    assert len(ours) == len(theirs) > 300
    theirs = _as_duckdb_types(theirs)
    for cutoff, part in ours.groupby("as_of"):
        other = theirs[theirs["as_of"] == cutoff].reset_index(drop=True)
        assert differences(part.reset_index(drop=True), other) == {}


def test_spark_leaves_the_callers_views_alone(spark, world) -> None:
    tx, _ = world
    spark.createDataFrame(pd.DataFrame({"x": [1]})).createOrReplaceTempView("tx")
    stx = spark.createDataFrame(tx[["customer_id", "timestamp", "amount"]])
    feats = build_features_spark(spark, stx, as_of="2025-06-30")
    assert "email_open_rate_365d" not in feats.columns
    assert feats.count() == len(build_features(tx, as_of="2025-06-30"))
    assert spark.table("tx").columns == ["x"]


def test_spark_names_a_missing_column(spark, world) -> None:
    tx, _ = world
    stx = spark.createDataFrame(tx[["customer_id", "timestamp"]])
    with pytest.raises(ValueError, match="amount"):
        build_features_spark(spark, stx, as_of="2025-06-30")
