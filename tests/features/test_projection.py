"""The numpy evaluation of the grid's feature projection equals DuckDB's, node by node."""

from __future__ import annotations

import dataclasses

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapport.features import definitions as defs
from rapport.features import dispatch, grid_features, projection
from rapport.features.build import build_features
from rapport.features.synthetic import SyntheticConfig, generate_synthetic

# Every construct the feature SQL uses, in the shapes it uses them, and the corners where
# numpy and DuckDB could part: NULLs, NaN and infinities, division by zero, NULL conditions.
EXPRESSIONS = [
    "i + j",
    "i - 1",
    "i * j",
    "i / j",  # DuckDB divides integers as DOUBLE; x/0 is inf, 0/0 NaN
    "x / y",
    "x * i",
    "CAST(i AS DOUBLE)",
    "CAST(i AS BIGINT)",
    "ABS(x)",
    "ABS(i - j)",
    "SQRT(GREATEST(0.0, x))",
    "GREATEST(i, j)",  # NULLs skipped
    "GREATEST(0.0, x)",
    "COALESCE(i, 0)",
    "COALESCE(i, j, 7)",
    "DATE_DIFF('day', d, e)",
    "CAST(DATE_DIFF('day', d, e) AS DOUBLE)",
    "GREATEST(d, e)",  # a DATE
    "x > y",  # NaN is above every number
    "x = y",  # and equal to itself
    "i > 0",
    "CASE WHEN i > 1 THEN x / (i - 1) END",
    "CASE WHEN x > 0 THEN x ELSE 0.0 END",
    "CASE WHEN x > 0 THEN i ELSE CAST(0 AS DOUBLE) END",
    "CASE WHEN ABS(x) + ABS(y) > 0 THEN (x - y) / (ABS(x) + ABS(y)) ELSE 0.0 END",
    "CASE WHEN i > j THEN 'a' WHEN j > i THEN 'b' END",
    "CASE WHEN COALESCE(i, 0) > 0 THEN CASE WHEN i = j THEN 'x' WHEN i > j THEN 'y' END END",
    "CASE WHEN i > 0 THEN i WHEN j > 0 THEN j END",
]

ints = st.one_of(st.none(), st.integers(-3, 3))
floats = st.one_of(
    st.none(),
    st.sampled_from([0.0, -0.0, 1.5, -2.25, 3.0, float("nan"), float("inf"), float("-inf")]),
)
days = st.one_of(st.none(), st.integers(-400, 20_000))


@st.composite
def relations(draw):
    n = draw(st.integers(1, 40))
    return pa.table(
        {
            "i": pa.array(draw(st.lists(ints, min_size=n, max_size=n)), pa.int64()),
            "j": pa.array(draw(st.lists(ints, min_size=n, max_size=n)), pa.int32()),
            "x": pa.array(draw(st.lists(floats, min_size=n, max_size=n)), pa.float64()),
            "y": pa.array(draw(st.lists(floats, min_size=n, max_size=n)), pa.float64()),
            "d": pa.array(draw(st.lists(days, min_size=n, max_size=n)), pa.int32()).cast(
                pa.date32()
            ),
            "e": pa.array(draw(st.lists(days, min_size=n, max_size=n)), pa.int32()).cast(
                pa.date32()
            ),
        }
    )


def _duckdb(sql: str, table: pa.Table) -> pa.Table:
    con = duckdb.connect()
    con.register("src", table)
    # the grid's widened view: integer columns as BIGINT
    con.execute("CREATE VIEW r AS SELECT * REPLACE (CAST(j AS BIGINT) AS j) FROM src")
    return con.execute(sql).to_arrow_table()


def _same(ours: pa.Table, theirs: pa.Table) -> None:
    assert ours.column_names == theirs.column_names
    for name in ours.column_names:
        a, b = ours.column(name), theirs.column(name)
        assert a.type == b.type, (name, a.type, b.type)
        assert a.is_null().to_pylist() == b.is_null().to_pylist(), name
        if pa.types.is_floating(a.type):
            np.testing.assert_array_equal(
                a.fill_null(0.0).to_numpy(), b.fill_null(0.0).to_numpy(), err_msg=name
            )
        else:
            assert a.to_pylist() == b.to_pylist(), name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=relations(), chunk_rows=st.sampled_from([1, 3, 1 << 16]))
def test_every_construct_equals_duckdb(table, chunk_rows):
    items = ", ".join(f"{e} AS c{k}" for k, e in enumerate(EXPRESSIONS))
    sql = f"WITH s AS (SELECT *, i - j AS k FROM r) SELECT {items}, k FROM s"
    ours = projection.evaluate(sql, table, source="r", keep=(), chunk_rows=chunk_rows)
    _same(ours, _duckdb(sql, table))


def test_kept_columns_pass_through_as_they_came():
    table = pa.table({"customer_id": pa.array(["a", "b"]), "i": pa.array([1, 2], pa.int32())})
    out = projection.evaluate(
        "SELECT customer_id, i, i + 1 AS k FROM r", table, source="r", keep=("customer_id",)
    )
    assert out.column("customer_id").type == pa.string()
    assert out.column("i").type == pa.int64()  # read as BIGINT, as DuckDB's widened view does
    assert out.column("k").to_pylist() == [2, 3]


@pytest.mark.parametrize("offset", [0, 3])
def test_dates_are_read_from_their_buffers_whatever_lies_under_a_null(offset):
    """Extreme day numbers under the NULLs, a sliced array: DuckDB's results all the same."""
    raw = np.array([7, -(2**31), 2**31 - 1, 40, 0, -(2**31), 12, 9, 2**31 - 1], dtype=np.int32)
    valid = np.array([1, 0, 0, 1, 1, 0, 1, 1, 0], dtype=bool)
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    d = pa.Array.from_buffers(pa.date32(), len(raw), [bitmap, pa.py_buffer(raw)])
    e = pa.array(np.arange(len(raw), dtype=np.int32) * 5 + 3).cast(pa.date32())
    j = pa.array(np.zeros(len(raw), dtype=np.int32))  # the comparison's view widens a j
    table = pa.table({"d": d, "e": e, "j": j}).slice(offset)
    sql = (
        "SELECT DATE_DIFF('day', d, e) AS a, CAST(DATE_DIFF('day', e, d) AS DOUBLE) AS b, "
        "COALESCE(DATE_DIFF('day', d, e), 1000) AS c, GREATEST(d, e) AS g, "
        "CASE WHEN d > e THEN DATE_DIFF('day', e, d) ELSE 0 END AS k FROM r"
    )
    ours = projection.evaluate(sql, table, source="r", keep=(), chunk_rows=2)
    _same(ours, _duckdb(sql, table))
    # split into chunks, a column takes Arrow's way: the same again
    chunked = pa.table({"d": pa.chunked_array([d[:4], d[4:]]), "e": e, "j": j}).slice(offset)
    _same(projection.evaluate(sql, chunked, source="r", keep=()), _duckdb(sql, chunked))


@pytest.mark.parametrize("chunk_rows", [1, 2, 1 << 16])
def test_a_null_double_is_nan_in_the_columns_written(chunk_rows):
    """Written as pandas shows a NULL double, chunk by chunk; the mask still says NULL."""
    table = pa.table(
        {
            "x": pa.array([0.5, None, 2.0, None, 4.0]),
            "h": pa.array([None, 1.5, None, None, 0.25], pa.float32()),  # widened as stored
            "i": pa.array([1, 2, 3, 4, 5]),
        }
    )
    columns = projection.evaluate_columns(
        "SELECT x * 2 AS y, h, i + 1 AS k FROM r", table, source="r", keep=(), chunk_rows=chunk_rows
    )
    y, h = columns["y"], columns["h"]
    assert isinstance(y.data, np.ndarray) and isinstance(y.null, np.ndarray)
    np.testing.assert_array_equal(y.data, [1.0, np.nan, 4.0, np.nan, 8.0])
    assert y.null.tolist() == [False, True, False, True, False]
    assert isinstance(h.data, np.ndarray) and h.data.dtype == np.float64
    np.testing.assert_array_equal(h.data, [np.nan, 1.5, np.nan, np.nan, 0.25])
    assert columns["k"].null is False and columns["k"].data.tolist() == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT i FROM r WHERE i > 0",
        "SELECT SUM(i) AS s FROM r",
        "SELECT LN(x) AS l FROM r",
        "SELECT CAST(x AS BIGINT) AS b FROM r",  # DuckDB rounds half away from zero
        "SELECT i FROM r JOIN q ON r.i = q.i",
        "SELECT i FROM nowhere",
        "SELECT 'a' || 'b' AS s FROM r",
        "SELECT CASE WHEN i > 0 THEN i ELSE 0.0 END AS c FROM r",  # DECIMAL(20, 1) to DuckDB
        "SELECT GREATEST(i, 0.5) AS c FROM r",
        "SELECT i + 0.5 AS c FROM r",
    ],
)
def test_constructs_it_does_not_know_are_refused(sql):
    table = pa.table({"i": pa.array([1, 2]), "x": pa.array([0.5, 1.5])})
    with pytest.raises(projection.UnsupportedSQLError):
        projection.evaluate(sql, table, source="r")


@pytest.mark.parametrize("with_interactions", [False, True])
def test_the_feature_sql_is_evaluated_without_falling_back(monkeypatch, with_interactions):
    tx, ix = generate_synthetic(SyntheticConfig(n_customers=200, seed=5))
    monkeypatch.setattr(dispatch, "GRID_MIN_ROW_CUTOFFS", 0)
    runs = []

    def must_not_fall_back(*args, **kwargs):
        runs.append(1)
        raise AssertionError("the evaluator refused the feature SQL")

    monkeypatch.setattr(grid_features, "duckdb_projection", must_not_fall_back)
    ixs = ix if with_interactions else None
    grid = build_features(tx, ixs, as_of=["2025-03-31", "2025-06-30"], validate=False)
    sql = build_features(
        tx, ixs, as_of=["2025-03-31", "2025-06-30"], validate=False, cutoff_batch=1
    )
    assert not runs and len(grid) > 100
    import pandas as pd

    pd.testing.assert_frame_equal(grid, sql, check_exact=False, rtol=1e-12)


def test_a_refused_projection_runs_on_duckdb_with_the_same_result(monkeypatch):
    tx, ix = generate_synthetic(SyntheticConfig(n_customers=150, seed=8))
    monkeypatch.setattr(dispatch, "GRID_MIN_ROW_CUTOFFS", 0)
    numpy_side = build_features(tx, ix, as_of="2025-06-30", validate=False)

    def refuse(*args, **kwargs):
        raise projection.UnsupportedSQLError("as a future definition might be")

    monkeypatch.setattr(projection, "evaluate", refuse)
    duckdb_side = build_features(tx, ix, as_of="2025-06-30", validate=False)
    import pandas as pd

    pd.testing.assert_frame_equal(numpy_side, duckdb_side, check_exact=False, rtol=1e-12)


def test_windows_of_any_spec_parse_once():
    spec = defs.FeatureSpec(windows=(7, 30), interaction_pairs=(("web", "visit"),))
    sql = defs.features_sql(dataclasses.replace(spec, pack_counts=False), source="grid")
    assert projection._parse(sql) is projection._parse(sql)


def test_a_repeated_subexpression_is_evaluated_once(monkeypatch):
    table = pa.table({"a": pa.array([1, 2, 3]), "b": pa.array([4, 5, 6])})
    sql = (
        "WITH s AS (SELECT a + b AS x, (a + b) * 2 AS y, a + 1 AS z, (a + b) - 1 AS w FROM t) "
        "SELECT x, y, z, w FROM s"
    )
    added: list[str] = []
    evaluate = projection._Evaluator._eval

    def counting(self, node):
        if isinstance(node, projection.exp.Add):
            added.append(node.sql())
        return evaluate(self, node)

    monkeypatch.setattr(projection._Evaluator, "_eval", counting)
    out = projection.evaluate(sql, table, source="t")
    # a + b once for x, y and w; a + 1 is another expression
    assert sorted(added) == ["a + 1", "a + b"]
    assert out.column("y").to_pylist() == [10, 14, 18]
    assert out.column("w").to_pylist() == [4, 6, 8]
    assert out.column("z").to_pylist() == [2, 3, 4]
