from __future__ import annotations

import decimal

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapport.features.build import build_features
from rapport.features.contracts import (
    DataValidationError,
    DuplicateRowsWarning,
    _duplicated,
    load_interactions,
    load_transactions,
    parse_column_map,
    validate_table,
)
from rapport.features.parsing import to_label


def raw_tx(**overrides) -> pd.DataFrame:
    data = {
        "customer_id": [1, 2, 3],
        "timestamp": ["2024-01-01", "2024-01-02 10:00:00", "2024-01-03"],
        "amount": [10.0, -2.5, 0.0],
    }
    data.update(overrides)
    return pd.DataFrame(data)


def test_canonical_output_types():
    tx = validate_table(raw_tx(), "transactions")
    assert list(tx.columns) == ["customer_id", "timestamp", "amount"]
    assert tx["timestamp"].dtype == "datetime64[us]"
    assert tx["amount"].dtype == "float64"
    assert tx["amount"].tolist() == [10.0, -2.5, 0.0]  # refunds and zero are allowed


def test_missing_column_names_it():
    with pytest.raises(DataValidationError, match="column 'amount': required column missing"):
        validate_table(raw_tx().drop(columns="amount"), "transactions")


def test_unparsable_timestamp_shows_rows():
    with pytest.raises(DataValidationError) as err:
        validate_table(raw_tx(timestamp=["2024-01-01", "not a date", "2024-13-45"]), "transactions")
    message = str(err.value)
    assert "column 'timestamp'" in message and "2 value(s) could not be parsed" in message
    assert "not a date" in message and "2024-13-45" in message
    assert list(err.value.rows.index) == [1, 2]


def test_numeric_timestamps_need_a_format():
    with pytest.raises(DataValidationError, match="ambiguous"):
        validate_table(raw_tx(timestamp=[19970101, 19970102, 19970103]), "transactions")
    tx = validate_table(
        raw_tx(timestamp=[19970101, 19970102, 19970103]), "transactions", timestamp_format="%Y%m%d"
    )
    assert tx["timestamp"].iloc[0] == pd.Timestamp("1997-01-01")


def test_non_numeric_amount_shows_rows():
    with pytest.raises(DataValidationError) as err:
        validate_table(raw_tx(amount=["10", "ten", "3.5"]), "transactions")
    assert "column 'amount': 1 non-numeric value(s)" in str(err.value)
    assert list(err.value.rows.index) == [1]


def test_decimal_amounts_become_float64():
    tx = validate_table(raw_tx(amount=[decimal.Decimal("10.10")] * 3), "transactions")
    assert tx["amount"].dtype == "float64" and tx["amount"].sum() == pytest.approx(30.3)


def test_null_id_shows_rows():
    with pytest.raises(DataValidationError) as err:
        validate_table(raw_tx(customer_id=[1, None, 3]), "transactions")
    assert "column 'customer_id': 1 row(s) without a customer id" in str(err.value)
    assert "missing-ids drop" in str(err.value)


def test_empty_table():
    with pytest.raises(DataValidationError, match="empty"):
        validate_table(raw_tx().iloc[:0], "transactions")


def test_duplicates_reported_and_dropped():
    df = pd.concat([raw_tx(), raw_tx().iloc[[0]]], ignore_index=True)
    with pytest.warns(DuplicateRowsWarning, match="1 dropped: identical to an earlier row"):
        tx = validate_table(df, "transactions")
    assert len(tx) == 3 and tx.attrs["duplicates_dropped"] == 1


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),  # string ids
            st.integers(0, 3),  # day
            st.sampled_from([0.0, -1.5, 2.25]),
            st.sampled_from(["Email", "email ", "web", "WEB"]),  # cleaned into one category
        ),
        min_size=1,
        max_size=25,
    )
)
def test_row_hash_duplicates_equal_pandas_duplicated(rows):
    # duplicates are found through 64-bit row hashes, then checked exactly: same rows as
    # pandas' own duplicated(keep="first"), including equal labels spelled differently
    frame = pd.DataFrame(rows, columns=["customer_id", "day", "amount", "channel"])
    frame["timestamp"] = pd.Timestamp("2024-01-01") + pd.to_timedelta(frame.pop("day"), "D")
    frame["channel"] = to_label(frame, "channel")
    assert _duplicated(frame).tolist() == frame.duplicated(keep="first").tolist()


def test_labels_are_cleaned_per_category_and_merged():
    raw = pd.DataFrame({"channel": pd.Categorical(["Email", "email ", "Web", "email"])})
    cleaned = to_label(raw, "channel")
    assert cleaned.tolist() == ["email", "email", "web", "email"]
    assert list(cleaned.cat.categories) == ["email", "web"]


def test_timezone_aware_becomes_naive_utc():
    ts = pd.to_datetime(["2024-01-01 01:00"] * 3).tz_localize("Europe/Paris")
    tx = validate_table(raw_tx(timestamp=ts), "transactions")
    assert tx["timestamp"].iloc[0] == pd.Timestamp("2024-01-01 00:00")


def test_column_map_from_cli_string_and_errors():
    df = raw_tx().rename(columns={"customer_id": "CustID", "amount": "Total"})
    tx = validate_table(
        df, "transactions", columns=parse_column_map("customer_id=CustID,amount=Total")
    )
    assert tx["customer_id"].tolist() == [1, 2, 3]
    with pytest.raises(DataValidationError, match="mapped to 'Nope'"):
        validate_table(df, "transactions", columns={"customer_id": "Nope"})
    with pytest.raises(DataValidationError, match="unknown Rapport column"):
        validate_table(df, "transactions", columns={"client": "CustID"})
    with pytest.raises(ValueError, match="rapport_name=your_column"):
        parse_column_map("customer_id")


def test_interactions_are_lower_cased_and_checked():
    ix = validate_table(
        pd.DataFrame(
            {
                "customer_id": [1, 1],
                "timestamp": ["2024-01-01", "2024-01-02"],
                "channel": [" Email", "WEB"],
                "event": ["Open", "visit"],
            }
        ),
        "interactions",
    )
    assert ix["channel"].tolist() == ["email", "web"] and ix["event"].tolist() == ["open", "visit"]
    with pytest.raises(DataValidationError, match="column 'event': 1 null"):
        validate_table(
            pd.DataFrame(
                {
                    "customer_id": [1],
                    "timestamp": ["2024-01-01"],
                    "channel": ["web"],
                    "event": [None],
                }
            ),
            "interactions",
        )


def test_csv_and_parquet_files_load_the_same(tmp_path):
    # ids are text in CSV (007 is not 7), so the Parquet file holds them as text too
    df = raw_tx(customer_id=["1", "2", "3"]).rename(columns={"timestamp": "InvoiceDate"})
    df.to_csv(tmp_path / "tx.csv", index=False)
    df.to_csv(tmp_path / "tx_semicolon.csv", index=False, sep=";")
    df.to_parquet(tmp_path / "tx.parquet")
    loaded = [
        load_transactions(tmp_path / name, columns="timestamp=InvoiceDate")
        for name in ("tx.csv", "tx_semicolon.csv", "tx.parquet")
    ]
    for other in loaded[1:]:
        pd.testing.assert_frame_equal(loaded[0], other, check_dtype=False)
    with pytest.raises(DataValidationError, match="file not found"):
        load_interactions(tmp_path / "missing.csv")
    (tmp_path / "tx.xlsx").write_text("x")
    with pytest.raises(DataValidationError, match=r"expected \.csv"):
        load_transactions(tmp_path / "tx.xlsx")


def test_build_features_validates_raw_frames():
    with pytest.raises(DataValidationError, match="column 'amount'"):
        build_features(raw_tx(amount=["1", "x", "2"]), as_of="2024-02-01")


def test_mixed_id_types_still_join():
    tx = validate_table(raw_tx(), "transactions")
    ix = pd.DataFrame(
        {"customer_id": ["1"], "timestamp": ["2024-01-05"], "channel": ["web"], "event": ["visit"]}
    )
    feats = build_features(tx, ix, as_of="2024-02-01")
    assert feats.set_index("customer_id").loc["1", "web_visits_30d"] == 1


def test_amounts_with_a_decimal_comma(tmp_path):
    path = tmp_path / "eu.csv"
    path.write_text(
        "customer_id;timestamp;amount\n1;03.01.2024;12,50\n1;03.02.2024;1.234,00\n2;10.02.2024;7\n"
    )
    with pytest.raises(DataValidationError, match="a decimal comma\\? pass decimal=','"):
        load_transactions(path, timestamp_format="%d.%m.%Y")
    tx = load_transactions(path, timestamp_format="%d.%m.%Y", decimal=",")
    assert tx["amount"].tolist() == [12.5, 1234.0, 7.0]
    # only the amount is read with the comma: dotted dates keep their meaning
    assert tx["timestamp"].dt.month.tolist() == [1, 2, 2]


def test_only_parquet_rapport_wrote_in_the_contract_counts_as_in_it(tmp_path):
    from rapport.features.contracts import is_contract_parquet
    from rapport.features.synthetic import SyntheticConfig, write_synthetic

    world = write_synthetic(SyntheticConfig(n_customers=50, seed=2), tmp_path / "world")
    assert is_contract_parquet(world.transactions_path, "transactions")
    assert is_contract_parquet(world.interactions_path, "interactions")
    assert not is_contract_parquet(world.transactions_path, "interactions")
    # the same rows written by someone else carry no promise: they are validated
    pd.read_parquet(world.transactions_path).to_parquet(tmp_path / "copy.parquet")
    assert not is_contract_parquet(tmp_path / "copy.parquet", "transactions")
    (tmp_path / "broken.parquet").write_text("not parquet")
    assert not is_contract_parquet(tmp_path / "broken.parquet", "transactions")
    assert not is_contract_parquet(tmp_path / "missing.parquet", "transactions")
