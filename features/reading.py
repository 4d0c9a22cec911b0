"""Reading a user's file into a raw frame: CSV (any delimiter, compressed or not) or Parquet.

What a file holds is checked later (:mod:`rapport.features.contracts`); here a file that cannot
be read at all (missing, empty, in another encoding, of an unknown type) gets one line naming
it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal

import pandas as pd

from rapport.features.errors import DataValidationError

TableKind = Literal["transactions", "interactions"]
TableSource = pd.DataFrame | str | os.PathLike[str]

_COMPRESSED = (".gz", ".zip", ".bz2", ".xz", ".zst")


def read_table(
    source: TableSource,
    *,
    kind: TableKind = "transactions",
    text_columns: tuple[str, ...] = (),
    encoding: str = "utf-8",
) -> pd.DataFrame:
    """Read a CSV (optionally compressed), Parquet file or folder, or pass a DataFrame through.

    Parameters
    ----------
    source
        A DataFrame (returned as is, not copied) or a path. ``.parquet``/``.pq`` files and
        folders are read as Parquet; ``.csv``, ``.txt``, ``.tsv`` (and their ``.gz``/``.zip``
        forms) as delimited text, the delimiter sniffed.
    kind
        Which table this is, for error messages.
    text_columns
        Columns a delimited file holds as text whatever they look like: ids (``007`` and
        ``7`` are two customers; a column with a blank id stays text, not float).
    encoding
        Text encoding of delimited files; a UTF-8 byte-order mark is read as one.

    Returns
    -------
    pandas.DataFrame
        The raw table, columns as the source names them.

    Raises
    ------
    DataValidationError
        Naming the file: not found, empty, not in ``encoding``, or of an unknown type.
    """
    if isinstance(source, pd.DataFrame):
        return source
    path = Path(source)
    if not path.exists():
        raise DataValidationError(kind, None, f"file not found: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    if path.is_dir() or (suffixes and suffixes[-1] in (".parquet", ".pq")):
        return pd.read_parquet(path)
    stem_suffixes = [s for s in suffixes if s not in _COMPRESSED]
    if stem_suffixes and stem_suffixes[-1] in (".csv", ".txt", ".tsv"):
        return _read_delimited(path, kind, text_columns, encoding, stem_suffixes[-1] == ".tsv")
    raise DataValidationError(
        kind, None, f"cannot read {path.name}: expected .csv, .tsv, .txt or .parquet"
    )


def _read_delimited(
    path: Path, kind: TableKind, text_columns: tuple[str, ...], encoding: str, tabs: bool
) -> pd.DataFrame:
    table = f"{kind} ({path.name})"
    if path.suffix.lower() not in _COMPRESSED and _blank_start(path):
        raise DataValidationError(table, None, "the file is empty (not even a header)")
    # utf-8-sig reads a byte-order mark as one, not as part of the first column's name.
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return pd.read_csv(
            path,
            # None sniffs the delimiter (comma, semicolon, ...) with the python engine
            sep="\t" if tabs else None,
            engine="c" if tabs else "python",
            encoding=codec,
            dtype={column: "string" for column in text_columns},
        )
    except pd.errors.EmptyDataError as err:
        raise DataValidationError(table, None, "the file is empty (not even a header)") from err
    except UnicodeDecodeError as err:
        raise DataValidationError(
            table,
            None,
            f"not {encoding} text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "pass its encoding, e.g. --encoding latin-1 (encoding='latin-1')",
        ) from err
    except (pd.errors.ParserError, csv.Error) as err:
        reason = str(err).splitlines()[0]
        raise DataValidationError(
            table, None, f"cannot be read as delimited text: {reason}"
        ) from err


def _blank_start(path: Path) -> bool:
    """Whether the file's first 4 KiB hold nothing but a byte-order mark and white space."""
    with path.open("rb") as handle:
        return not handle.read(4096).strip(b"\xef\xbb\xbf \r\n\t")
