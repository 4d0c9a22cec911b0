from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from rapport.serving.scoring import CompiledModel, Scorer, load_registered
from rapport.training.models import ChurnModel, FeatureSchemaError, next_purchase_date


def _pyfunc_predictions(served, name: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(served.settings().tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    frame = served.snapshot.copy()
    # MLflow's schema enforcement wants the text columns as plain strings.
    for col in ("segment", "preferred_channel"):
        frame[col] = frame[col].astype("object").where(frame[col].notna(), None)
    return model.predict(frame)


def test_scorer_equals_registered_models(served, state):
    scorer = state.scorer
    scores = scorer.score_frame(served.snapshot)
    churn = _pyfunc_predictions(served, "rapport-churn")
    value = _pyfunc_predictions(served, "rapport-clv")
    np.testing.assert_allclose(scores.churn_probability, churn["churn_probability"], rtol=1e-12)
    assert (scores.risk_tier == churn["risk_tier"].to_numpy()).all()
    np.testing.assert_allclose(scores.predicted_value, value["predicted_value"], rtol=1e-12)
    np.testing.assert_allclose(scores.p_alive, value["p_alive"], rtol=1e-12)
    np.testing.assert_allclose(scores.expected_purchases, value["expected_purchases"], rtol=1e-12)
    # The pyfunc's schema drops as_of, so the date is rebuilt from its expected days.
    dates = next_purchase_date(
        served.snapshot["as_of"], value["expected_days_to_next_purchase"].to_numpy()
    )
    expected = dates.to_numpy("datetime64[D]")
    got = scores.expected_next_purchase_date
    assert ((got == expected) | (np.isnat(got) & np.isnat(expected))).all()
    assert np.isnat(got).sum() < len(got)  # most customers get a date


def test_reasons_are_the_largest_contributions(served, state):
    scorer: Scorer = state.scorer
    rows = served.snapshot.head(20)
    scores = scorer.score_frame(rows, explain=4)
    contrib = scorer.churn.model.contributions(rows)
    for i, reasons in enumerate(scores.churn_reasons):
        assert len(reasons) == 4
        sizes = [abs(r.contribution) for r in reasons]
        assert sizes == sorted(sizes, reverse=True)
        top = contrib.drop(columns="_bias").iloc[i].abs().nlargest(4)
        assert [r.feature for r in reasons] == list(top.index)
    # SHAP additivity: contributions plus bias give the raw score the probability came from.
    assert scores.value_reasons is not None and len(scores.value_reasons) == 20


def test_compiled_model_matches_pandas_path_on_unseen_categories(served, state):
    compiled: CompiledModel = state.scorer.churn
    rows = served.snapshot.head(5).copy()
    rows["preferred_channel"] = pd.array(["fax", None, "email", "web", "zzz"], dtype="string")
    cols = state.scorer.columns_from_frame(rows)
    x = compiled.matrix(cols, len(rows), compiled.btyd(cols))
    np.testing.assert_allclose(compiled.predict(x), compiled.model.predict_proba(rows), rtol=1e-12)


def test_missing_feature_columns_are_named(served, state):
    with pytest.raises(FeatureSchemaError, match="recency_days"):
        state.scorer.columns_from_frame(served.snapshot.drop(columns="recency_days"))


def test_loading_ignores_a_registry_set_earlier_in_the_process(served, tmp_path, monkeypatch):
    # a notebook (or the demo) that worked against another store leaves MLflow's registry
    # pointed there, and `models:/` URIs resolve through the registry
    uri = served.settings().tracking_uri
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, "unset at teardown")  # MLflow writes both
        monkeypatch.delenv(name)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    mlflow.set_tracking_uri(other)
    mlflow.set_registry_uri(other)
    loaded = load_registered("rapport-churn", "champion", tracking_uri=uri)
    assert isinstance(loaded.model, ChurnModel)
    assert loaded.version.version == "1"
    assert mlflow.get_registry_uri() == uri


def test_any_family_serves_through_the_same_contract(served, state):
    """A logistic churn model and a BG/NBD x Gamma-Gamma value model, registered through the
    same pyfunc: the scorer calls their own prediction methods and matches the pyfunc."""
    from rapport.serving.scoring import LoadedModel
    from rapport.training.candidates import BTYDValueModel, LogisticChurnModel
    from rapport.training.config import QUICK_OVERRIDES, load_config
    from rapport.training.pyfunc import RapportModel

    rows = served.snapshot.copy()
    # any labels fit the contract check: churned if no purchase for 90 days, spend as given
    rows["churned_90d"] = (rows["recency_days"] > 90).astype("int8")
    rows["future_spend_180d"] = rows["total_spend"]
    churn = LogisticChurnModel(load_config("churn", dict(QUICK_OVERRIDES))).fit(rows)
    clv = load_config("clv", {**QUICK_OVERRIDES, "horizon_days": 180})
    value = BTYDValueModel(clv).fit(rows)
    version = state.scorer.churn_version
    scorer = Scorer(LoadedModel(churn, version), LoadedModel(value, version))
    scores = scorer.score_frame(served.snapshot, explain=3)
    churn_out = RapportModel(churn).predict(None, served.snapshot)
    value_out = RapportModel(value).predict(None, served.snapshot)
    np.testing.assert_allclose(scores.churn_probability, churn_out["churn_probability"], rtol=1e-12)
    assert (scores.risk_tier == churn_out["risk_tier"].to_numpy()).all()
    np.testing.assert_allclose(scores.predicted_value, value_out["predicted_value"], rtol=1e-12)
    np.testing.assert_allclose(scores.p_alive, value_out["p_alive"], rtol=1e-12)
    # logistic reasons: the exact coefficient x standardised input, largest first
    contrib = churn.contributions(served.snapshot.head(1)).drop(columns="_bias").iloc[0]
    top = contrib.abs().nlargest(3)
    assert [r.feature for r in scores.churn_reasons[0]] == list(top.index)
    assert scores.churn_reasons[0][0].contribution == pytest.approx(contrib[top.index[0]])
    # BG/NBD x Gamma-Gamma has no additive decomposition: no reasons, and it says why
    assert scores.value_reasons == [[] for _ in range(len(served.snapshot))]
    assert "no additive per-feature decomposition" in value.contributions_note
