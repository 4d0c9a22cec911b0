from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from rapport.features.datasets import load_cdnow
from rapport.serving.cli import app

runner = CliRunner()


@pytest.fixture
def cdnow_csv(tmp_path):
    path = tmp_path / "cdnow.csv"
    df = load_cdnow("sample").rename(columns={"customer_id": "CustID", "timestamp": "Date"})
    df.to_csv(path, index=False)
    return path


def test_features_build_with_mapped_columns(tmp_path, cdnow_csv):
    out = tmp_path / "feats.parquet"
    result = runner.invoke(
        app,
        [
            "features", "build", "--transactions", str(cdnow_csv),
            "--tx-columns", "customer_id=CustID,timestamp=Date",
            "--as-of", "1997-09-30,1997-12-31", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    feats = pd.read_parquet(out)
    assert feats.groupby("as_of").size().tolist() == [2_357, 2_357]
    assert feats.loc[feats["as_of"] == "1997-09-30", "frequency"].sum() == 2_457
    assert "Champions" in result.output


def test_validation_error_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame(
        {"customer_id": [1, 2], "timestamp": ["2024-01-01", "2024-01-02"], "amount": ["1", "x"]}
    ).to_csv(bad, index=False)
    out = tmp_path / "feats.parquet"
    result = runner.invoke(
        app, ["features", "build", "-t", str(bad), "--as-of", "2024-02-01", "-o", str(out)]
    )
    assert result.exit_code == 2
    assert "column 'amount'" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_duplicate_rows_are_reported_as_one_warning_line(tmp_path):
    path = tmp_path / "tx.csv"
    pd.DataFrame(
        {"customer_id": [1, 1, 2], "timestamp": ["2024-01-01"] * 3, "amount": [5.0, 5.0, 7.0]}
    ).to_csv(path, index=False)
    out = tmp_path / "feats.parquet"
    result = runner.invoke(
        app, ["features", "build", "-t", str(path), "--as-of", "2024-02-01", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 dropped: identical to an earlier row in every column (amount 5.00)" in text
    # Python's own warning format would name a source line of the CLI module
    assert "DuplicateRowsWarning" not in result.output
    assert pd.read_parquet(out)["n_purchases"].tolist() == [1, 1]


@pytest.mark.parametrize("command", ["build", "labels"])
def test_cutoffs_before_the_first_purchase(tmp_path, command):
    path = tmp_path / "tx.csv"
    pd.DataFrame(
        {
            "customer_id": [1, 2, 2],
            "timestamp": ["2024-03-05", "2024-04-01", "2024-12-31"],
            "amount": [5.0, 7.0, 3.0],
        }
    ).to_csv(path, index=False)  # runs to the end of 2024: the labels' horizon is in the data
    out = tmp_path / "out.parquet"
    args = ["features", command, "-t", str(path), "-o", str(out), "--as-of"]
    result = runner.invoke(app, [*args, "2023-12-31,2024-01-31"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "before the first purchase in the transactions, on 2024-03-05" in text
    assert not out.exists()
    # one cutoff in reach: built, and the empty ones are named
    result = runner.invoke(app, [*args, "2024-01-31,2024-03-31"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 cutoff(s) before the first purchase (2024-03-05) have no rows" in text
    assert pd.read_parquet(out)["customer_id"].tolist() == ["1"]  # ids are text in CSV


def test_contract_parquet_is_read_as_it_is(tmp_path):
    world = tmp_path / "world"
    made = runner.invoke(app, ["data", "synth", "-o", str(world), "--transactions", "3000"])
    assert made.exit_code == 0, made.output
    # the same rows without Rapport's contract mark: loaded and validated first
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("transactions", "interactions"):
        pd.read_parquet(world / f"{name}.parquet").to_parquet(plain / f"{name}.parquet")
    outputs = {}
    for folder in (world, plain):
        out = tmp_path / f"{folder.name}.parquet"
        result = runner.invoke(
            app,
            ["features", "build", "-t", str(folder / "transactions.parquet"),
             "-i", str(folder / "interactions.parquet"), "--as-of", "2025-06-30",
             "-o", str(out)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert ("read as it is" in text) == (folder == world)
        assert ("Loading transactions" in text) == (folder == plain)
        outputs[folder.name] = pd.read_parquet(out).sort_values("customer_id", ignore_index=True)
    assert len(outputs["world"]) > 100
    pd.testing.assert_frame_equal(outputs["world"], outputs["plain"])


def test_interactions_take_their_own_timestamp_format(tmp_path):
    tx = pd.DataFrame(
        {"CustID": [1, 1, 2], "When": ["03/01/2024 10:00", "15/02/2024 09:30", "20/02/2024 18:00"]}
    ).assign(Total=[10.0, 20.0, 5.0])
    ix = pd.DataFrame(
        {
            "customer_id": [1, 2],
            "timestamp": ["2024-02-01 08:00:00", "2024-02-21 07:00:00"],
            "channel": ["Email", "web"],
            "event": ["open", "visit"],
        }
    )
    tx.to_csv(tmp_path / "tx.csv", index=False)
    ix.to_csv(tmp_path / "ix.csv", index=False)
    out = tmp_path / "feats.parquet"
    args = [
        "features", "build", "-t", str(tmp_path / "tx.csv"), "-i", str(tmp_path / "ix.csv"),
        "--tx-columns", "customer_id=CustID,timestamp=When,amount=Total",
        "--timestamp-format", "%d/%m/%Y %H:%M", "--as-of", "2024-02-29", "-o", str(out),
    ]  # fmt: skip
    # the transactions' format applies to the interactions unless they have their own
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "with the format '%d/%m/%Y %H:%M'" in refused.output
    assert not out.exists()
    result = runner.invoke(app, [*args, "--ix-timestamp-format", "auto"])
    assert result.exit_code == 0, result.output
    feats = pd.read_parquet(out).set_index("customer_id")
    assert feats.loc["1", "n_purchases"] == 2 and feats.loc["1", "email_opens_30d"] == 1
    assert feats.loc["2", "web_visits_30d"] == 1


def test_features_build_reads_decimal_commas(tmp_path):
    path = tmp_path / "eu.csv"
    path.write_text(
        "Kunde;Datum;Betrag\n1;03.01.2024;12,50\n1;03.02.2024;1.234,00\n2;10.02.2024;7\n"
    )
    out = tmp_path / "feats.parquet"
    result = runner.invoke(
        app,
        [
            "features", "build", "-t", str(path), "--as-of", "2024-02-29", "-o", str(out),
            "--tx-columns", "customer_id=Kunde,timestamp=Datum,amount=Betrag",
            "--timestamp-format", "%d.%m.%Y", "--decimal-comma",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    feats = pd.read_parquet(out).set_index("customer_id")
    assert feats.loc["1", "total_spend"] == 1246.5 and feats.loc["2", "total_spend"] == 7.0


def test_labels_command(tmp_path, cdnow_csv):
    out = tmp_path / "labels.parquet"
    result = runner.invoke(
        app,
        [
            "features", "labels", "-t", str(cdnow_csv),
            "--tx-columns", "customer_id=CustID,timestamp=Date",
            "--as-of", "1997-09-30", "--horizon-days", "273", "-o", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    labels = pd.read_parquet(out)
    assert len(labels) == 2_357 and labels["churned_273d"].dtype == bool


def test_demo_main_job(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPPORT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["demo", "--customers", "1500", "--no-serve"])
    assert result.exit_code == 0, result.output
    feats = pd.read_parquet(tmp_path / "home" / "demo" / "features.parquet")
    labels = pd.read_parquet(tmp_path / "home" / "demo" / "labels.parquet")
    assert feats["as_of"].nunique() == 12
    assert len(feats) == len(labels)
    assert "Demo customers by segment" in result.output
    # The main job goes on to train and register both models in the embedded MLflow store.
    assert "rapport-churn v1: champion" in result.output
    assert "rapport-clv v1: champion" in result.output
    assert (tmp_path / "home" / "mlflow.db").exists()
    # ... then writes the serving snapshot (one row per customer at the last day of data)
    # and scores every customer with the champions.
    snapshot = pd.read_parquet(tmp_path / "home" / "snapshot.parquet")
    scores = pd.read_parquet(tmp_path / "home" / "scores.parquet")
    assert snapshot["as_of"].nunique() == 1 and snapshot["customer_id"].is_unique
    assert set(scores["customer_id"]) == set(snapshot["customer_id"])
    assert scores["churn_probability"].between(0, 1).all()
    assert (scores["churn_model"] == "rapport-churn/1").all()
    assert "curl -s -X POST http://127.0.0.1:3000/v1/score/by-id" in result.output


def test_every_option_has_help():
    import typer.main

    group = typer.main.get_command(app)

    def walk(command):
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert getattr(param, "help", None), f"{command.name} --{param.name} has no help"
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(group)


def test_a_warning_while_loading_is_printed_once(capsys):
    # Printing a recorded warning through warnings.showwarning inside the recording appended
    # it to the list being read: the loop never ended and memory ran out.
    import warnings

    from rapport.features.console import run_or_exit

    def warns() -> int:
        warnings.warn("dates look day-first", UserWarning, stacklevel=1)
        return 7

    assert run_or_exit(warns) == 7
    assert capsys.readouterr().err.count("warning: dates look day-first") == 1
