from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapport.features.build import build_features, build_labels, parse_cutoffs, stream_features
from rapport.features.definitions import FeatureSpec, feature_columns, features_sql, transpile

AS_OF = "2024-03-01"


def row(feats: pd.DataFrame, customer: str) -> pd.Series:
    return feats.set_index("customer_id").loc[customer]


def test_population_is_customers_with_a_purchase_by_the_cutoff(tiny_tx):
    feats = build_features(tiny_tx, as_of=AS_OF)
    # C buys first after the cutoff, D only has a refund.
    assert feats["customer_id"].tolist() == ["A", "B"]
    assert (feats["as_of"] == pd.Timestamp(AS_OF)).all()


def test_btyd_and_rfm_hand_computed(tiny_tx):
    a = row(build_features(tiny_tx, as_of=AS_OF), "A")
    # purchase days 01-01, 01-11, 02-10; cutoff 03-01 (2024 is a leap year)
    assert a["frequency"] == 2
    assert a["recency"] == 40
    assert a["T"] == 60
    assert a["monetary_value"] == pytest.approx((20 + 30) / 2)
    assert a["recency_days"] == 20
    assert a["tenure_days"] == 60
    assert a["n_purchases"] == 4
    assert a["n_purchase_days"] == 3
    assert a["total_spend"] == pytest.approx(60.0)
    assert a["avg_order_value"] == pytest.approx(16.25)
    assert a["spend_std"] == pytest.approx(np.std([10, 5, 20, 30], ddof=1))
    assert a["ipt_mean_days"] == pytest.approx(20.0)
    assert a["ipt_std_days"] == pytest.approx(np.std([10, 30], ddof=1))


def test_windows_and_trends_hand_computed(tiny_tx):
    a = row(build_features(tiny_tx, as_of=AS_OF, windows=(30, 90)), "A")
    # 30d = days after 01-31: the 02-10 purchase and the 02-12 refund
    assert a["purchases_30d"] == 1
    assert a["spend_30d"] == pytest.approx(25.0)
    # the 30 days before that, (01-01, 01-31]: the 01-11 purchase (20)
    assert a["purchases_trend_30d"] == pytest.approx(0.0)
    assert a["spend_trend_30d"] == pytest.approx((25 - 20) / (25 + 20))
    assert a["purchases_90d"] == 4
    assert a["spend_90d"] == pytest.approx(60.0)
    assert a["purchases_trend_90d"] == pytest.approx(1.0)


def test_single_purchase_customer(tiny_tx):
    b = row(build_features(tiny_tx, as_of=AS_OF), "B")
    assert (b["frequency"], b["recency"], b["T"], b["monetary_value"]) == (0, 0, 10, 0)
    assert b["recency_days"] == 10
    assert math.isnan(b["spend_std"]) and math.isnan(b["ipt_mean_days"])


def test_interaction_features_hand_computed(tiny_tx, tiny_ix):
    feats = build_features(tiny_tx, tiny_ix, as_of=AS_OF)
    a, b = row(feats, "A"), row(feats, "B")
    assert a["email_sends_30d"] == 2
    assert a["email_opens_30d"] == 1  # the 03-02 open is after the cutoff
    assert a["email_clicks_30d"] == 1
    assert a["web_visits_30d"] == 0 and a["web_visits_90d"] == 1
    assert a["phone_complaints_30d"] == 1
    assert a["days_since_email"] == 14
    assert a["days_since_web"] == 56
    assert a["days_since_phone"] == 10
    assert a["responses_30d"] == 2 and a["responses_90d"] == 3
    assert a["days_since_response"] == 14
    assert a["complaints_30d"] == 1 and a["days_since_complaint"] == 10
    assert a["email_open_rate_365d"] == pytest.approx(0.5)
    assert a["email_click_rate_365d"] == pytest.approx(0.5)
    assert a["preferred_channel"] == "email"
    # B never interacted: counts are zero, recencies and rates missing
    assert b["email_sends_30d"] == 0 and b["responses_365d"] == 0
    assert pd.isna(b["days_since_email"]) and pd.isna(b["email_open_rate_365d"])
    assert pd.isna(b["preferred_channel"])
    # Z interacted but never bought: not a customer
    assert "Z" not in set(feats["customer_id"])


def test_point_in_time_events_after_the_cutoff_change_nothing(tiny_tx, tiny_ix):
    before = build_features(tiny_tx, tiny_ix, as_of=AS_OF)
    later_tx = pd.DataFrame(
        {
            "customer_id": ["A", "B", "E", "A"],
            "timestamp": pd.to_datetime(
                [
                    "2024-03-02 00:00:00",
                    "2024-06-01 00:00:00",
                    "2024-03-01 00:00:01",
                    "2024-03-01 23:59:59",
                ]
            ),
            "amount": [999.0, 5.0, 1.0, 0.0],
        }
    )
    # one on the cutoff day itself: a date cutoff includes that whole day
    changed_tx = pd.concat([tiny_tx[tiny_tx["timestamp"] <= "2024-03-01 23:59:59"], later_tx[:2]])
    changed_ix = tiny_ix.copy()
    changed_ix.loc[changed_ix["timestamp"] > "2024-03-02", "event"] = "click"
    after = build_features(changed_tx, changed_ix, as_of=AS_OF)
    pd.testing.assert_frame_equal(before, after)
    on_day = build_features(pd.concat([tiny_tx, later_tx[2:]]), as_of=AS_OF)
    assert set(on_day["customer_id"]) == {"A", "B", "E"}
    assert row(on_day, "A")["recency_days"] == 0


def test_several_cutoffs_equal_separate_runs(tiny_tx, tiny_ix):
    cutoffs = ["2024-01-31", "2024-02-29", "2024-03-01"]
    together = build_features(tiny_tx, tiny_ix, as_of=cutoffs)
    assert together.groupby("as_of").size().tolist() == [1, 2, 2]
    for cutoff in cutoffs:
        alone = build_features(tiny_tx, tiny_ix, as_of=cutoff)
        part = together[together["as_of"] == pd.Timestamp(cutoff)].reset_index(drop=True)
        # scores are quantiles within a cutoff, so they match too
        pd.testing.assert_frame_equal(part, alone, check_dtype=False)


def test_columns_follow_the_definitions(tiny_tx, tiny_ix):
    feats = build_features(tiny_tx, tiny_ix, as_of=AS_OF)
    pairs = (
        ("email", "click"),
        ("email", "open"),
        ("email", "sent"),
        ("phone", "complaint"),
        ("web", "visit"),
    )
    assert list(feats.columns) == feature_columns(FeatureSpec(interaction_pairs=pairs))


def test_pinned_pairs_give_fixed_columns(tiny_tx, tiny_ix):
    pairs = [("email", "sent"), ("app", "open")]
    feats = build_features(tiny_tx, tiny_ix, as_of=AS_OF, interaction_pairs=pairs)
    assert "app_opens_30d" in feats.columns and "web_visits_30d" not in feats.columns
    assert (feats["app_opens_365d"] == 0).all()


def test_labels_hand_computed(tiny_tx):
    labels = build_labels(tiny_tx, as_of=AS_OF, horizon_days=10).set_index("customer_id")
    assert list(labels.index) == ["A", "B"]
    assert bool(labels.loc["A", "churned_10d"]) is True
    assert bool(labels.loc["B", "churned_10d"]) is False
    assert labels.loc["B", "future_spend_10d"] == pytest.approx(15.0)
    assert labels.loc["B", "future_purchases_10d"] == 1


def test_labels_refuse_a_censored_horizon(tiny_tx):
    with pytest.raises(ValueError, match="censored") as info:
        build_labels(tiny_tx, as_of=AS_OF, horizon_days=60)
    # the error names the latest cutoff that works: the last transaction day less 60 days
    last_day = pd.Timestamp(tiny_tx["timestamp"].max()).date()
    assert f"whole horizon in the data is {last_day - dt.timedelta(days=60)}" in str(info.value)
    labels = build_labels(tiny_tx, as_of=AS_OF, horizon_days=60, allow_incomplete=True)
    assert len(labels) == 2


def test_parse_cutoffs():
    assert parse_cutoffs("2024-02-29, 2024-01-31,2024-02-29") == [
        dt.date(2024, 1, 31),
        dt.date(2024, 2, 29),
    ]
    assert parse_cutoffs(pd.Timestamp("2024-01-31", tz="UTC")) == [dt.date(2024, 1, 31)]
    with pytest.raises(ValueError, match="time of day"):
        parse_cutoffs("2024-01-31 12:00")
    with pytest.raises(ValueError, match="not a date"):
        parse_cutoffs("yesterday-ish")


def test_timezone_aware_input_is_compared_in_utc():
    # 23:30 in New York on 03-01 is 04:30 UTC on 03-02: after a 03-01 cutoff.
    tx = pd.DataFrame(
        {
            "customer_id": [1, 2],
            "timestamp": pd.to_datetime(["2024-02-01 10:00", "2024-03-01 23:30"]).tz_localize(
                "America/New_York"
            ),
            "amount": [1.0, 2.0],
        }
    )
    feats = build_features(tx, as_of=AS_OF)
    assert feats["customer_id"].tolist() == [1]


def test_same_result_whatever_the_row_order(tiny_tx, tiny_ix):
    a = build_features(tiny_tx, tiny_ix, as_of=AS_OF)
    b = build_features(tiny_tx.sample(frac=1, random_state=3), tiny_ix[::-1], as_of=AS_OF)
    pd.testing.assert_frame_equal(a, b)


def test_sql_transpiles_to_spark():
    spec = FeatureSpec(interaction_pairs=(("email", "sent"), ("email", "open"), ("web", "visit")))
    spark = transpile(features_sql(spec), "spark")
    assert "DATEDIFF" in spark.upper() and "PERCENT_RANK" in spark.upper()
    # Spark spells the purchase-day window's null handling after the call
    assert "LAG(CASE WHEN is_purchase THEN day END) IGNORE NULLS OVER w" in spark


# --- properties -------------------------------------------------------------------------------

events = st.lists(
    st.tuples(
        st.integers(0, 6),  # customer
        st.integers(0, 400),  # day offset
        st.sampled_from([-20.0, 0.0, 5.0, 12.5, 40.0]),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events, cutoff_offset=st.integers(0, 400))
def test_properties(events, cutoff_offset):
    start = pd.Timestamp("2023-01-01")
    tx = pd.DataFrame(
        {
            "customer_id": [c for c, _, _ in events],
            "timestamp": [start + pd.Timedelta(days=d, hours=c) for c, d, _ in events],
            "amount": [a for _, _, a in events],
        }
    )
    as_of = (start + pd.Timedelta(days=cutoff_offset)).date()
    feats = build_features(tx, as_of=as_of, windows=(7, 30, 90), validate=False)
    if feats.empty:
        return
    assert (feats["frequency"] <= feats["n_purchases"] - 1).all()
    assert (feats["recency"] <= feats["T"]).all()
    assert (feats["recency_days"] + feats["recency"] == feats["T"]).all()
    assert (feats["purchases_7d"] <= feats["purchases_30d"]).all()
    assert (feats["purchases_30d"] <= feats["purchases_90d"]).all()
    assert (feats["purchases_90d"] <= feats["n_purchases"]).all()
    for col in ("purchases_trend_30d", "spend_trend_30d"):
        assert feats[col].between(-1, 1).all()
    assert feats[["r_score", "f_score", "m_score", "fm_score"]].isin(range(1, 6)).all().all()
    assert feats["segment"].notna().all()


def test_trusted_parquet_fast_path_equals_frames(tmp_path, tiny_tx, tiny_ix):
    from rapport.features.contracts import validate_table

    tx, ix = validate_table(tiny_tx, "transactions"), validate_table(tiny_ix, "interactions")
    tx.to_parquet(tmp_path / "tx.parquet")
    ix.to_parquet(tmp_path / "ix.parquet")
    framed = build_features(tx, ix, as_of=AS_OF)
    scanned = build_features(
        tmp_path / "tx.parquet", tmp_path / "ix.parquet", as_of=AS_OF, validate=False
    )
    pd.testing.assert_frame_equal(framed, scanned, check_dtype=False)
    labels = build_labels(tmp_path / "tx.parquet", as_of=AS_OF, horizon_days=10, validate=False)
    assert labels["churned_10d"].tolist() == [True, False]


def test_packed_counts_overflow_falls_back_to_exact_counts(monkeypatch):
    # With 9-bit packed fields, 600 events in a window overflow the packed BIGINT: DuckDB must
    # refuse it and build_features must rerun unpacked, giving the exact counts.
    import duckdb

    from rapport.features import definitions as defs
    from rapport.features.build import connect

    start = pd.Timestamp("2024-02-20")
    stamps = [start + pd.Timedelta(minutes=m) for m in range(600)]
    tx = pd.DataFrame(
        {
            "customer_id": ["A"] * 600 + ["B"],
            "timestamp": [*stamps, start],
            "amount": [1.0] * 601,
        }
    )
    ix = pd.DataFrame(
        {
            "customer_id": ["A"] * 600 + ["B"],
            "timestamp": [*stamps, start],
            "channel": "email",
            "event": ["open"] * 600 + ["sent"],
        }
    )
    expected = build_features(tx, ix, as_of=AS_OF)
    monkeypatch.setattr(defs, "PACK_BITS", 9)
    monkeypatch.setattr(defs, "_PACK_WIDTH", 7)
    spec = FeatureSpec(interaction_pairs=(("email", "open"), ("email", "sent")))
    with connect() as con, pytest.raises((duckdb.ConversionException, duckdb.OutOfRangeException)):
        con.register("tx", tx)
        con.register("ix", ix)
        con.execute(f"CREATE TABLE cutoffs AS SELECT DATE '{AS_OF}' AS as_of")
        con.execute(features_sql(spec)).fetchall()
    feats = build_features(tx, ix, as_of=AS_OF)
    pd.testing.assert_frame_equal(feats, expected)
    assert row(feats, "A")["purchases_30d"] == 600
    assert row(feats, "A")["email_opens_30d"] == 600
    assert row(feats, "A")["responses_365d"] == 600


@pytest.mark.parametrize("as_of", [AS_OF, "2024-02-29,2024-03-01"])
def test_result_is_an_ordinary_writeable_frame(tiny_tx, tiny_ix, as_of):
    # several cutoffs in batches of one take the lean conversion: columns of their own
    feats = build_features(tiny_tx, tiny_ix, as_of=as_of, cutoff_batch=1)
    feats.loc[0, "n_purchases"] = 99
    feats.iloc[0, feats.columns.get_loc("total_spend")] = 1.5
    assert feats.loc[0, "n_purchases"] == 99


def test_connections_spill_to_their_own_directory():
    # A shared spill directory let concurrent processes read each other's DuckDB temp files.
    from rapport.features.build import connect

    with connect() as a, connect() as b:
        dirs = [
            con.execute("SELECT current_setting('temp_directory')").fetchone()[0]  # type: ignore[index]
            for con in (a, b)
        ]
    assert dirs[0] != dirs[1]


def test_streamed_batches_equal_one_build_and_write_atomically(tmp_path, tiny_tx, tiny_ix):
    from rapport.features.build import iter_features, write_features

    cutoffs = ["2024-01-31", "2024-02-15", "2024-02-29", "2024-03-31", "2024-04-30"]
    whole = build_features(tiny_tx, tiny_ix, as_of=cutoffs)
    batches = list(iter_features(tiny_tx, tiny_ix, as_of=cutoffs, cutoff_batch=2))
    assert [b["as_of"].nunique() for b in batches] == [2, 2, 1]
    pd.testing.assert_frame_equal(pd.concat(batches, ignore_index=True), whole)

    out = tmp_path / "features.parquet"
    rows, last = write_features(iter(batches), out)
    assert rows == len(whole)
    assert last["as_of"].max() == whole["as_of"].max()
    back = pd.read_parquet(out)
    pd.testing.assert_frame_equal(back, whole, check_dtype=False, check_categorical=False)
    assert list(back.columns) == list(whole.columns)

    def failing():
        yield batches[0]
        raise RuntimeError("disk full")

    target = tmp_path / "never.parquet"
    with pytest.raises(RuntimeError, match="disk full"):
        write_features(failing(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.parquet"]


def test_streamed_chunks_equal_build_features(tiny_tx, tiny_ix):
    whole = build_features(tiny_tx, tiny_ix, as_of="2024-06-30")
    chunks = list(stream_features(tiny_tx, tiny_ix, as_of="2024-06-30", chunk_rows=1))
    assert len(chunks) == len(whole) and all(len(c) == 1 for c in chunks)
    streamed = pd.concat(chunks).sort_values("customer_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(streamed, whole.sort_values("customer_id").reset_index(drop=True))


def _batches():
    """Two feature-like Arrow batches: integers, floats with nulls, a timestamp, text, a
    category, several chunks in the second."""
    import pyarrow as pa

    def batch(ids, spend, channel):
        n = len(ids)
        return pa.table(
            {
                "customer_id": pa.array(ids, pa.int64()),
                "as_of": pa.array(np.full(n, np.datetime64("2024-01-31", "us"))),
                "n_purchases": pa.array(np.arange(n, dtype="int64")),
                "spend_std": pa.array(spend, pa.float64()),
                "r_score": pa.array(np.ones(n, dtype="int32")),
                "preferred_channel": pa.array(channel, pa.string()),
                "segment": pa.DictionaryArray.from_arrays(
                    pa.array(np.zeros(n, dtype="int8")), pa.array(["New", "Lost"])
                ),
            }
        )

    first = batch([1, 2], [1.5, None], ["web", None])
    second = pa.concat_tables(
        [batch([3], [2.0], ["email"]), batch([4, 5], [None, 0.5], ["a", "b"])]
    )
    return first, second


def test_stacked_batches_equal_their_pandas_concatenation():
    from rapport.features.assembly import Stacker

    first, second = _batches()
    expected = pd.concat([first.to_pandas(), second.to_pandas()], ignore_index=True)
    stacker = Stacker(first.num_rows + second.num_rows)
    stacker.add(first)
    stacker.add(second)
    frame = stacker.frame()
    pd.testing.assert_frame_equal(frame, expected)
    # one block per dtype (what to_pandas makes), and writes land in the frame itself
    assert frame._mgr.nblocks == 6
    frame.loc[4, "n_purchases"] = 99
    frame.loc[0, "spend_std"] = -1.0
    assert frame.loc[4, "n_purchases"] == 99 and frame.loc[0, "spend_std"] == -1.0


def test_stacker_refuses_batches_that_do_not_fit():
    from rapport.features.assembly import Stacker

    first, second = _batches()
    with pytest.raises(ValueError, match="more than the 3 rows"):
        stacker = Stacker(3)
        stacker.add(first)
        stacker.add(second)
    stacker = Stacker(10)
    stacker.add(first)
    with pytest.raises(ValueError, match="differ in columns"):
        stacker.add(second.drop_columns(["segment"]))
    with pytest.raises(ValueError, match="hold 2 rows, 10 expected"):
        stacker.frame()
    import pyarrow as pa

    gaps = first.set_column(2, "n_purchases", pa.array([1, None], pa.int64()))
    with pytest.raises(ValueError, match="'n_purchases' has nulls"):
        Stacker(2).add(gaps)


def test_frames_own_their_text_so_duckdb_results_are_freed():
    # a text column left on DuckDB's buffers kept the whole result alive beside the frame
    import duckdb

    from rapport.features.assembly import own_text

    table = duckdb.sql("SELECT range AS n, 'c' || range::VARCHAR AS name FROM range(1000)").arrow()
    table = table.read_all() if hasattr(table, "read_all") else table
    own = own_text(table)
    assert own.equals(table)
    before = {b.address for c in table.column("name").chunks for b in c.buffers() if b}
    after = {b.address for c in own.column("name").chunks for b in c.buffers() if b}
    assert not before & after
    assert (
        own.column("n").chunks[0].buffers()[1].address
        == table.column("n").chunks[0].buffers()[1].address
    )


@pytest.mark.parametrize(
    ("event", "plural"),
    [
        ("sent", "sends"),
        ("delivered", "deliveries"),
        ("open", "opens"),
        ("Click-Through", "click_throughs"),
        ("reply", "replies"),
        ("survey", "surveys"),
        ("push", "pushes"),
    ],
)
def test_event_names_read_as_plural_counts(event, plural):
    from rapport.features.definitions import event_plural

    assert event_plural(event) == plural


@pytest.mark.parametrize("threshold_offset, engine", [(0, "grid"), (1, "sql")])
def test_the_default_engine_follows_event_rows_times_cutoffs(
    tiny_tx, tiny_ix, tmp_path, monkeypatch, threshold_offset, engine
):
    """The grid from GRID_MIN_ROW_CUTOFFS event rows x cutoffs on, the SQL alone below it;
    Parquet inputs are counted from their footers, and both engines give the same frame."""
    from rapport.features import dispatch, grid_features

    ix_path = tmp_path / "ix.parquet"
    tiny_ix.to_parquet(ix_path)
    cutoffs = ["2024-02-01", "2024-03-01"]
    work = (len(tiny_tx) + len(tiny_ix)) * len(cutoffs)
    monkeypatch.setattr(dispatch, "GRID_MIN_ROW_CUTOFFS", work + threshold_offset)
    ran: list[str] = []
    grid_tables = grid_features.grid_feature_tables

    def spy(*args, **kwargs):
        ran.append("grid")
        yield from grid_tables(*args, **kwargs)

    monkeypatch.setattr(grid_features, "grid_feature_tables", spy)
    feats = build_features(tiny_tx, ix_path, as_of=cutoffs)
    assert ran == (["grid"] if engine == "grid" else [])
    expected = build_features(tiny_tx, ix_path, as_of=cutoffs, cutoff_batch=1)
    pd.testing.assert_frame_equal(feats, expected)
