"""The demo's steps are plain functions a notebook calls, as ``rapport demo`` does."""

from __future__ import annotations

import datetime as dt

from rapport.features.settings import RapportSettings
from rapport.serving.demo import DEMO_CUTOFFS, demo_cutoffs, make_demo_world


def test_demo_cutoffs_keep_every_label_horizon_inside_the_data():
    cutoffs = demo_cutoffs(dt.date(2025, 12, 31), 90)
    assert len(cutoffs) == DEMO_CUTOFFS and cutoffs == sorted(cutoffs)
    assert cutoffs[-1] == dt.date(2025, 9, 30)
    assert all(c + dt.timedelta(days=90) <= dt.date(2025, 12, 31) for c in cutoffs)


def test_make_demo_world_builds_and_writes_features_and_labels(tmp_path):
    world = make_demo_world(300, seed=3, settings=RapportSettings(home=tmp_path))
    assert world.folder == tmp_path / "demo" and world.transactions.exists()
    assert world.features["as_of"].nunique() == DEMO_CUTOFFS
    assert len(world.features) == len(world.labels)
    assert (world.folder / "features.parquet").exists()
    assert (world.folder / "labels.parquet").exists()
