"""A hand-made invoice-line export, as online retailers' ERPs write them, end to end.

Every expected value below is worked out by hand from the eleven lines in ``LINES``.
"""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from rapport.features.build import build_features
from rapport.features.contracts import DataValidationError, load_transactions
from rapport.features.load_report import LoadReport
from rapport.serving.cli import app

# Invoice 536365: three distinct lines with equal totals (6.00 each) and one line repeated in
# every column. C536401 cancels one mug. The guest line has no CustomerID. 00777 keeps its
# leading zeros and is not customer 777.
LINES = """\ufeffInvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,A,Mug,2,2024-01-05 10:00,3.00,12345,United Kingdom
536365,B,Cup,3,2024-01-05 10:00,2.00,12345,United Kingdom
536365,C,Tin,1,2024-01-05 10:00,6.00,12345,United Kingdom
536365,C,Tin,1,2024-01-05 10:00,6.00,12345,United Kingdom
536400,A,Mug,1,2024-02-10 09:00,3.00,12345,United Kingdom
C536401,A,Mug,-1,2024-02-11 09:00,3.00,12345,United Kingdom
536500,B,Cup,5,2024-03-01 12:00,2.00,00777,United Kingdom
536500,D,Bag,1,2024-03-01 12:00,10.00,00777,United Kingdom
536600,A,Mug,4,2024-03-05 15:00,3.00,,United Kingdom
536700,B,Cup,1,2024-03-20 08:00,2.00,777,United Kingdom
536701,B,Cup,2,2024-03-20 08:30,2.00,777,United Kingdom
"""

MAP = "customer_id=CustomerID,timestamp=InvoiceDate,order_id=InvoiceNo,amount=Quantity*UnitPrice"


@pytest.fixture
def lines_csv(tmp_path):
    path = tmp_path / "invoice_lines.csv"
    path.write_text(LINES, encoding="utf-8")
    return path


def test_lines_become_orders_and_nothing_is_lost_silently(lines_csv):
    tx = load_transactions(lines_csv, columns=MAP, missing_ids="drop")
    report = LoadReport.of(tx)
    assert report.rows_read == 11
    # dropped: the repeated Tin line (6.00) and the guest line (12.00)
    assert report.rows_dropped("duplicates") == 1 and report.rows_dropped("missing_ids") == 1
    assert report.amount_read == pytest.approx(6 + 6 + 6 + 6 + 3 - 3 + 10 + 10 + 12 + 2 + 4)
    assert report.amount_kept == pytest.approx(18 + 3 - 3 + 20 + 2 + 4)
    # 9 lines kept; 536365's three and 536500's two lines are one order each
    assert report.lines_merged == 3 and report.rows_kept == 6
    orders = tx.set_index("order_id")["amount"].to_dict()
    assert orders == {"536365": 18.0, "536400": 3.0, "C536401": -3.0, "536500": 20.0,
                      "536700": 2.0, "536701": 4.0}  # fmt: skip
    assert set(tx["customer_id"]) == {"12345", "00777", "777"}
    line = report.line()
    assert "11 rows read, 6 kept as orders (3 lines merged into their order)" in line
    assert "1 dropped: no customer id (amount 12.00)" in line
    assert "1 dropped: identical to an earlier row in every column (amount 6.00)" in line


def test_features_count_orders_not_lines(lines_csv):
    tx = load_transactions(lines_csv, columns=MAP, missing_ids="drop")
    feats = build_features(tx, as_of="2024-03-31").set_index("customer_id")
    big = feats.loc["12345"]
    # two purchases (orders 536365 and 536400) and one cancellation: 18 + 3 - 3
    assert big["n_purchases"] == 2 and big["total_spend"] == pytest.approx(18.0)
    assert big["avg_order_value"] == pytest.approx((18 + 3) / 2)
    assert big["purchases_30d"] == 0 and big["purchases_90d"] == 2
    zero = feats.loc["00777"]
    assert zero["n_purchases"] == 1 and zero["total_spend"] == pytest.approx(20.0)
    plain = feats.loc["777"]
    # two orders on one day: two purchases, one purchase day
    assert plain["n_purchases"] == 2 and plain["n_purchase_days"] == 1
    assert plain["avg_order_value"] == pytest.approx(3.0)


def test_without_order_id_each_line_is_a_purchase(lines_csv):
    columns = "customer_id=CustomerID,timestamp=InvoiceDate,amount=Quantity*UnitPrice"
    tx = load_transactions(lines_csv, columns=columns, missing_ids="drop")
    assert LoadReport.of(tx).lines_merged == 0 and len(tx) == 9
    feats = build_features(tx, as_of="2024-03-31").set_index("customer_id")
    assert feats.loc["12345", "n_purchases"] == 4  # three 536365 lines and 536400


def test_policies_error_and_keep(lines_csv):
    with pytest.raises(DataValidationError, match=r"1 row\(s\) without a customer id") as err:
        load_transactions(lines_csv, columns=MAP)
    assert "invoice_lines.csv" in str(err.value)
    with pytest.raises(DataValidationError, match="identical to an earlier row"):
        load_transactions(lines_csv, columns=MAP, missing_ids="drop", duplicates="error")
    kept = load_transactions(lines_csv, columns=MAP, missing_ids="drop", duplicates="keep")
    assert LoadReport.of(kept).duplicates_kept == 1
    assert kept.set_index("order_id").loc["536365", "amount"] == pytest.approx(24.0)


def test_a_bad_expression_names_itself_and_the_columns(lines_csv):
    with pytest.raises(DataValidationError) as err:
        load_transactions(
            lines_csv,
            columns="customer_id=CustomerID,timestamp=InvoiceDate,amount=Quantity*Price",
            missing_ids="drop",
        )
    message = str(err.value)
    assert "column 'amount'" in message and "'Quantity*Price'" in message
    assert "UnitPrice" in message  # the columns present


def test_cli_prints_the_accounting_line(tmp_path, lines_csv):
    out = tmp_path / "feats.parquet"
    args = ["features", "build", "-t", str(lines_csv), "--tx-columns", MAP,
            "--as-of", "2024-03-31", "-o", str(out), "--currency", "GBP"]  # fmt: skip
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--missing-ids drop" in refused.output
    assert not out.exists()
    result = CliRunner().invoke(app, [*args, "--missing-ids", "drop"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "11 rows read, 6 kept as orders (3 lines merged into their order)" in text
    assert "no customer id (amount 12.00 GBP)" in text
    assert "amount read 62.00 GBP, kept 44.00 GBP" in text
    feats = pd.read_parquet(out).set_index("customer_id")
    assert feats.loc["12345", "n_purchases"] == 2
