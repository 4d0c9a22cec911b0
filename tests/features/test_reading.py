"""Files as users' tools write them: byte-order marks, latin-1, empty files, ids, dates."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from rapport.features.contracts import DataValidationError, load_transactions
from rapport.serving.cli import app


def write(tmp_path, text: str, name: str = "tx.csv", encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    path = write(tmp_path, "\ufeffcustomer_id,timestamp,amount\n1,2024-01-01,5\n")
    assert load_transactions(path)["customer_id"].tolist() == ["1"]


def test_ids_keep_their_leading_zeros(tmp_path):
    text = "customer_id,timestamp,amount\n007,2024-01-01,5\n07,2024-01-02,5\n7,2024-01-03,5\n"
    tx = load_transactions(write(tmp_path, text))
    assert tx["customer_id"].tolist() == ["007", "07", "7"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "the file is empty"), ("customer_id,timestamp,amount\n", "the table is empty")],
)
def test_empty_and_header_only_files_name_the_file(tmp_path, text, problem):
    with pytest.raises(DataValidationError, match=problem) as err:
        load_transactions(write(tmp_path, text, "orders.csv"))
    assert str(err.value).startswith("transactions (orders.csv)")


def test_latin1_file_names_itself_and_reads_with_its_encoding(tmp_path):
    path = write(
        tmp_path, "customer_id,timestamp,amount\nJosé,2024-01-01,5\n", "ventes.csv", "latin-1"
    )
    with pytest.raises(DataValidationError, match=r"ventes.csv.*not utf-8 text.*latin-1"):
        load_transactions(path)
    assert load_transactions(path, encoding="latin-1")["customer_id"].tolist() == ["José"]


DAY_MONTH = "customer_id,timestamp,amount\n1,04/03/2025,5\n2,05/03/2025,5\n"


def test_dates_that_fit_both_orders_are_refused_without_a_word(tmp_path):
    path = write(tmp_path, DAY_MONTH)
    with pytest.raises(DataValidationError, match="--dayfirst or --monthfirst"):
        load_transactions(path)
    assert load_transactions(path, dayfirst=True)["timestamp"].iloc[0] == pd.Timestamp("2025-03-04")
    assert load_transactions(path, dayfirst=False)["timestamp"].iloc[0] == pd.Timestamp(
        "2025-04-03"
    )


def test_a_day_over_twelve_shows_the_order_and_says_so(tmp_path):
    path = write(tmp_path, DAY_MONTH + "3,13/01/2025,5\n")
    with pytest.warns(UserWarning, match="read as day/month dates .13/01/2025 shows it"):
        tx = load_transactions(path)
    assert tx["timestamp"].tolist() == [
        pd.Timestamp("2025-03-04"),
        pd.Timestamp("2025-03-05"),
        pd.Timestamp("2025-01-13"),
    ]
    mixed = write(tmp_path, DAY_MONTH + "3,13/01/2025,5\n4,01/13/2025,5\n", "mixed.csv")
    with pytest.raises(DataValidationError, match=r"both day first .* and month first"):
        load_transactions(mixed)


def test_iso_dates_need_no_order(tmp_path):
    path = write(tmp_path, "customer_id,timestamp,amount\n1,2025-03-04,5\n")
    assert load_transactions(path)["timestamp"].iloc[0] == pd.Timestamp("2025-03-04")


def test_cli_day_first_dates_print_one_line_and_finish(tmp_path):
    path = write(tmp_path, DAY_MONTH + "3,13/01/2025,5\n")
    out = tmp_path / "f.parquet"
    args = ["features", "build", "-t", str(path), "--as-of", "2025-03-31", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert " ".join(result.output.split()).count("read as day/month dates") == 1
    refused = CliRunner().invoke(app, [*args[:3], str(write(tmp_path, DAY_MONTH, "a.csv")),
                                       *args[4:]])  # fmt: skip
    assert refused.exit_code == 2 and "--dayfirst" in refused.output
    dayfirst = CliRunner().invoke(app, [*args[:3], str(tmp_path / "a.csv"), *args[4:],
                                        "--dayfirst"])  # fmt: skip
    assert dayfirst.exit_code == 0, dayfirst.output
