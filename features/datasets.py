"""Bundled data sets: CDNOW (real transactions, no interactions).

See ``features/data/README.md`` for source and licence.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

import pandas as pd

from rapport.features.contracts import validate_table

CdnowPart = Literal["master", "sample"]

#: End of the 39-week calibration period used throughout the BTYD literature.
CDNOW_CALIBRATION_END = "1997-09-30"
#: Last day of the CDNOW data (end of the 39-week holdout).
CDNOW_END = "1998-06-30"

_FILES = {"master": "CDNOW_master.txt", "sample": "CDNOW_sample.txt"}
_COLUMNS = {
    "master": ["customer_id", "date", "n_cds", "amount"],
    "sample": ["customer_id", "sample_id", "date", "n_cds", "amount"],
}


def load_cdnow(part: CdnowPart = "master") -> pd.DataFrame:
    """Load CDNOW transactions in Rapport's transaction contract.

    Parameters
    ----------
    part
        ``"master"`` (23,570 customers) or ``"sample"`` (2,357 customers).

    Returns
    -------
    pandas.DataFrame
        ``customer_id`` (int64, the master file's id in both parts), ``timestamp``
        (``datetime64[us]``, midnight), ``amount`` (float64, dollars) and ``order_id`` (int64,
        the line number: identical lines are distinct purchases, not duplicates).
    """
    if part not in _FILES:
        raise ValueError(f"part must be 'master' or 'sample', not {part!r}")
    source = resources.files("rapport.features").joinpath("data", _FILES[part])
    with resources.as_file(source) as path:
        raw = pd.read_csv(
            path,
            sep=r"\s+",
            header=None,
            skiprows=1 if part == "master" else 0,
            names=_COLUMNS[part],
            dtype={"customer_id": "int64", "date": "string", "amount": "float64"},
        )
    raw["timestamp"] = pd.to_datetime(raw["date"], format="%Y%m%d")
    raw["order_id"] = pd.RangeIndex(1, len(raw) + 1, dtype="int64")
    return validate_table(raw[["customer_id", "timestamp", "amount", "order_id"]], "transactions")
