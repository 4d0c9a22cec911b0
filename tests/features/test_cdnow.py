from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rapport.features.build import build_features
from rapport.features.datasets import CDNOW_CALIBRATION_END, CDNOW_END, load_cdnow

DATA = Path(__file__).resolve().parents[1] / "data"


def test_master_and_sample_shapes():
    master, sample = load_cdnow("master"), load_cdnow("sample")
    assert (len(master), master["customer_id"].nunique()) == (69_659, 23_570)
    assert (len(sample), sample["customer_id"].nunique()) == (6_919, 2_357)
    assert master["timestamp"].min() == pd.Timestamp("1997-01-01")
    assert master["timestamp"].max() == pd.Timestamp(CDNOW_END)
    # the sample's ids are master ids
    assert set(sample["customer_id"]) <= set(master["customer_id"])


def test_sample_week_39_has_2457_repeat_purchases():
    feats = build_features(load_cdnow("sample"), as_of=CDNOW_CALIBRATION_END)
    assert len(feats) == 2_357
    assert feats["frequency"].sum() == 2_457


@pytest.mark.parametrize(
    ("as_of", "expected"),
    [
        (CDNOW_CALIBRATION_END, "cdnow_sample_lifetimes_w39.csv"),
        (CDNOW_END, "cdnow_sample_lifetimes_end.csv"),
    ],
)
def test_btyd_summary_equals_lifetimes(as_of, expected):
    ours = build_features(load_cdnow("sample"), as_of=as_of).set_index("customer_id")
    theirs = pd.read_csv(DATA / expected).set_index("customer_id")
    assert sorted(ours.index) == sorted(theirs.index)
    ours = ours.loc[theirs.index]
    for column in ("frequency", "recency", "T"):
        np.testing.assert_array_equal(ours[column].to_numpy(), theirs[column].to_numpy())
    np.testing.assert_allclose(ours["monetary_value"], theirs["monetary_value"], atol=1e-5)


def test_invalid_part():
    with pytest.raises(ValueError, match="master"):
        load_cdnow("full")  # type: ignore[arg-type]
