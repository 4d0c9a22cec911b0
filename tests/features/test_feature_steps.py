"""A feature defined in SQL must have its grid counterpart and its reference value.

docs/features.md lists the steps of adding an aggregate; this test names the one left out.
"""

from __future__ import annotations

import pytest
from pandas_reference import pandas_features

from rapport.features import dispatch
from rapport.features.build import build_features
from rapport.features.contracts import validate_table

AS_OF = "2024-03-01"


def test_every_sql_feature_has_a_grid_column_and_a_reference_value(tiny_tx, tiny_ix, monkeypatch):
    tx, ix = validate_table(tiny_tx, "transactions"), validate_table(tiny_ix, "interactions")
    sql = build_features(tx, ix, as_of=AS_OF, validate=False, cutoff_batch=1)
    monkeypatch.setattr(dispatch, "GRID_MIN_ROW_CUTOFFS", 0)  # the grid at any size
    try:
        grid = build_features(tx, ix, as_of=AS_OF, validate=False)
    except Exception as err:
        pytest.fail(
            f"the grid cannot build the SQL's features ({err}): see steps 2-4 of "
            "'Adding an aggregate' in docs/features.md (kernel, grid, projection)"
        )
    reference = pandas_features(tx, ix, as_of=AS_OF)
    no_grid = [c for c in sql.columns if c not in grid.columns]
    assert not no_grid, (
        f"SQL features without a grid column: {no_grid}; see steps 2-3 of 'Adding an "
        "aggregate' in docs/features.md (features/kernels.py, features/grid.py)"
    )
    no_reference = [c for c in sql.columns if c not in reference.columns]
    assert not no_reference, (
        f"SQL features without a pandas reference value: {no_reference}; add them to "
        "tests/features/pandas_reference.py (step 5 of 'Adding an aggregate', docs/features.md)"
    )
    assert list(grid.columns) == list(sql.columns) == list(reference.columns)
