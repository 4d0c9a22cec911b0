"""The grid's feature projection evaluated on numpy arrays, from the very same SQL text.

On the grid path every feature is a row-wise expression of the base aggregates
(``features_sql(spec, source="grid")``: a chain of ``SELECT`` lists over one relation, no
join, filter or aggregate). DuckDB evaluates it in about 0.6 s for 1.5M customers and then
spends as long again converting its result to Arrow; numpy evaluates the same expressions in
a fraction of that and hands the arrays to Arrow without a copy. The SQL stays the one
definition: this module parses it with sqlglot and evaluates each node by DuckDB's rules
(``/`` is floating division with IEEE infinities, ``GREATEST`` skips NULLs, NaN compares
greater than every number and equal to itself, NULL propagates through arithmetic and
comparisons). A construct it does not know raises :class:`UnsupportedSQLError`, and the caller runs
the query on DuckDB instead. Tests compare it with DuckDB operator by operator and on every
feature set the grid tests build.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import sqlglot
from sqlglot import exp


class UnsupportedSQLError(NotImplementedError):
    """The SQL uses a construct this evaluator does not implement (DuckDB must run it)."""


Data = np.ndarray | int | float | None
#: What arithmetic takes: an array or a constant (numpy's stubs type neither loosely enough).
Number = Any


@dataclasses.dataclass
class _Value:
    """A column, or a constant: numpy values (bool, int64 or float64) and a NULL mask.

    Text is ``labels`` and int32 codes into them. ``kept`` names an input column of
    ``evaluate(keep=...)``: passed through, it leaves as it entered (ids of any type).
    ``date`` marks day numbers of a DATE. ``decimal`` marks a literal like ``0.0``, a
    DECIMAL to DuckDB: DOUBLE beside a DOUBLE, but a DECIMAL beside integers, which this
    evaluator does not do.
    """

    data: Data
    null: np.ndarray | bool = False
    kept: str | None = None
    date: bool = False
    labels: tuple[str, ...] | None = None
    decimal: bool = False


#: A column of :func:`evaluate_columns`.
Column = _Value


@dataclasses.dataclass(frozen=True)
class _Query:
    """A parsed projection: the relation each ``SELECT`` reads and its items, in order."""

    selects: tuple[tuple[str | None, str, tuple[exp.Expression, ...]], ...]
    keys: dict[int, int]  # id(node) -> its structure's number, the key of repeated subexpressions


_SELECT_PARTS = {"expressions", "from", "from_", "with", "with_"}


@functools.lru_cache(maxsize=32)
def _parse(sql: str) -> _Query:
    """The SQL parsed in DuckDB's dialect and checked to be a projection (cached)."""
    tree = sqlglot.parse_one(sql, read="duckdb")
    if not isinstance(tree, exp.Select):
        raise UnsupportedSQLError(type(tree).__name__)
    with_ = tree.args.get("with_") or tree.args.get("with")
    named = [(cte.alias_or_name, cte.this) for cte in (with_.expressions if with_ else [])]
    selects = []
    for name, select in [*named, (None, tree)]:
        if not isinstance(select, exp.Select):
            raise UnsupportedSQLError(type(select).__name__)
        extra = [k for k, v in select.args.items() if v and k not in _SELECT_PARTS]
        if extra:
            raise UnsupportedSQLError(f"SELECT with {extra}")
        source = select.args.get("from_") or select.args.get("from")
        if source is None or not isinstance(source.this, exp.Table):
            raise UnsupportedSQLError("SELECT without a single table")
        selects.append((name, source.this.name, tuple(select.expressions)))
    return _Query(tuple(selects), _structure_keys(tree))


def _structure_keys(tree: exp.Expression) -> dict[int, int]:
    """``id(node)`` -> a number equal for equal subtrees.

    A node's structure is its type and arguments with its children by their numbers, built
    bottom-up in one walk; the SQL text of every node, the key before, took 0.18 s for the
    feature query's 752 nodes.
    """
    numbers: dict[Hashable, int] = {}
    keys: dict[int, int] = {}

    def key(value: object) -> Hashable:
        if isinstance(value, exp.Expression):
            return keys[id(value)]
        if isinstance(value, list):
            return tuple(key(v) for v in value)
        return value if isinstance(value, Hashable) else repr(value)

    for node in reversed(list(tree.walk(bfs=True))):  # children before their parents
        structure = (type(node).__name__, tuple((k, key(v)) for k, v in node.args.items()))
        keys[id(node)] = numbers.setdefault(structure, len(numbers))
    return keys


#: Rows evaluated at a time: temporaries of this size stay in cache and in the allocator's
#: reach, where whole-column temporaries (12 MB at 1.5M customers) each cost fresh pages.
#: With threads, 65,536 rows (512 KB temporaries) were fresh pages again: 420k page faults
#: against 190k, the frame's own.
CHUNK_ROWS = 1 << 15
#: Threads that evaluate chunks side by side (at most; no more than the CPUs).
MAX_THREADS = 4


def evaluate(
    sql: str,
    table: pa.Table,
    *,
    source: str,
    keep: tuple[str, ...] = ("customer_id", "as_of"),
    chunk_rows: int = CHUNK_ROWS,
) -> pa.Table:
    """Evaluate ``sql``, a projection of the relation ``source``, on ``table``.

    Integer columns of ``table`` are read as BIGINT, as the grid's widened view
    (:func:`~rapport.features.grid.widen_counts_sql`) gives them to DuckDB, except the
    ``keep`` columns, which pass through as they are; the result has DuckDB's column types
    (BIGINT, DOUBLE, VARCHAR, DATE). Rows are evaluated ``chunk_rows`` at a time.

    Raises
    ------
    UnsupportedSQLError
        Where the query has anything but ``WITH`` chains of ``SELECT`` lists over ``source``,
        or a construct or type this evaluator does not implement.
    """
    columns = evaluate_columns(sql, table, source=source, keep=keep, chunk_rows=chunk_rows)
    return pa.table(
        {
            name: table.column(value.kept) if value.kept is not None else arrow(value)
            for name, value in columns.items()
        }
    )


#: Where :func:`evaluate_columns` writes: given each computed column's name and dtype, an
#: array of the table's length for each.
Allocator = Callable[[dict[str, np.dtype]], dict[str, np.ndarray]]


def evaluate_columns(
    sql: str,
    table: pa.Table,
    *,
    source: str,
    keep: tuple[str, ...] = ("customer_id", "as_of"),
    chunk_rows: int = CHUNK_ROWS,
    allocate: Allocator | None = None,
) -> dict[str, Column]:
    """:func:`evaluate`'s columns as numpy, written where ``allocate`` says.

    Each computed column is ``data`` (int64, float64, or int32 codes into ``labels`` for
    text; a DATE's day numbers where ``date``) and ``null``, a mask or ``False``; values
    under the mask are NaN in a float column and unspecified otherwise. A ``keep`` column
    passed through is named by ``kept`` (take it from ``table``). ``allocate`` gets the
    computed columns' dtypes once the first rows are evaluated, and returns the arrays to
    write them into (a frame's blocks, say).
    """
    query = _parse(sql)
    inputs = {name: _input(table.column(name), name, keep) for name in table.column_names}
    n = table.num_rows

    def rows(start: int) -> dict[str, _Value]:
        stop = min(start + chunk_rows, n)
        relations = {source: {name: _rows(v, start, stop) for name, v in inputs.items()}}
        for name, read, items in query.selects:
            if read not in relations:
                raise UnsupportedSQLError(f"unknown relation {read}")
            evaluator = _Evaluator(relations[read], query.keys, stop - start)
            result = evaluator.select(items)
            if name is not None:
                relations[name] = result
        return result

    first = rows(0)
    outputs = _allocated(first, n, allocate)
    nulls = threading.Lock()

    def store(start: int, result: dict[str, _Value]) -> None:
        stop = min(start + chunk_rows, n)
        for name, value in result.items():
            if value.kept is None:
                _store(outputs[name], value, start, stop, nulls)

    store(0, first)
    del first
    starts = range(chunk_rows, n, chunk_rows)
    workers = min(len(starts), os.cpu_count() or 1, MAX_THREADS)
    if workers > 1:
        # chunks write disjoint rows, and numpy releases the GIL in its loops: the cores
        # share the arithmetic and the first touch of the output pages
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(lambda start: store(start, rows(start)), starts):
                pass
    else:
        for start in starts:
            store(start, rows(start))
    return outputs


def _allocated(first: dict[str, _Value], n: int, allocate: Allocator | None) -> dict[str, _Value]:
    """The output columns, shaped after the first chunk's."""
    computed = {name: v for name, v in first.items() if v.kept is None}
    for name, value in computed.items():
        if not isinstance(value.data, np.ndarray):
            raise UnsupportedSQLError(f"a constant column: {name}")
    # integer outputs are BIGINT and floats DOUBLE (an input passed through unwidened is
    # widened as it is stored); text codes stay int32, booleans booleans
    dtypes = {name: _output_type(v) for name, v in computed.items()}
    arrays = allocate(dtypes) if allocate else {k: np.empty(n, dtype=d) for k, d in dtypes.items()}
    return {
        name: (
            dataclasses.replace(value, data=None, null=False)
            if value.kept is not None
            else _Value(arrays[name], False, date=value.date, labels=value.labels)
        )
        for name, value in first.items()
    }


def _input(column: pa.ChunkedArray, name: str, keep: tuple[str, ...]) -> _Value:
    days = _dates_from_buffers(column)
    if days is not None:
        return dataclasses.replace(days, kept=name if name in keep else None)
    null: np.ndarray | bool = False
    if column.null_count:
        null = column.is_null().to_numpy(zero_copy_only=False)
    kind, kept = column.type, name if name in keep else None
    if pa.types.is_date32(kind):
        column, date = column.cast(pa.int32()), True
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
        date = False
    elif kept is not None:
        return _Value(None, null, kept)  # passed through only
    else:
        raise UnsupportedSQLError(f"an input column of type {kind}")
    if column.null_count:
        column = column.fill_null(0)
    # one chunk without nulls: a view; widened chunk by chunk (see _rows)
    return _Value(column.to_numpy(), null, kept, date=date)


def _dates_from_buffers(column: pa.ChunkedArray) -> _Value | None:
    """A DATE column with NULLs as its day numbers and mask, read from its buffers.

    No filled copy: whatever an int32 slot under a NULL holds cannot overflow the int64
    arithmetic dates take part in, and the mask keeps it out of every result. Seven such
    columns of the grid took 0.055 s through Arrow's ``is_null`` and ``fill_null``, on the
    projection's serial start. None for other columns.
    """
    if not (pa.types.is_date32(column.type) and column.null_count and column.num_chunks == 1):
        return None
    (chunk,) = column.chunks
    validity, data = chunk.buffers()[:2]
    if validity is None or data is None:
        return None
    n, offset = len(chunk), chunk.offset
    days = np.frombuffer(data, dtype=np.int32, count=n + offset)[offset:]
    bits = np.frombuffer(validity, dtype=np.uint8)
    valid = np.unpackbits(bits, count=n + offset, bitorder="little")[offset:]
    return _Value(days, valid == 0, date=True)


def _rows(value: _Value, start: int, stop: int) -> _Value:
    """Rows ``start:stop`` of an input column (views; :meth:`_Evaluator._numbers` widens)."""
    data, null = value.data, value.null
    return dataclasses.replace(
        value,
        data=data[start:stop] if isinstance(data, np.ndarray) else data,
        null=null[start:stop] if isinstance(null, np.ndarray) else null,
    )


def _wide(data: Number) -> Number:
    """Integers as BIGINT (int64) and floats as DOUBLE, as the widened view types them."""
    if isinstance(data, np.ndarray) and data.dtype.itemsize < 8 and data.dtype.kind in "iuf":
        return data.astype(np.float64 if data.dtype.kind == "f" else np.int64)
    return data


def _output_type(value: _Value) -> np.dtype:
    assert isinstance(value.data, np.ndarray)
    kind = value.data.dtype.kind
    if value.labels is None and kind in "iuf":
        return np.dtype(np.float64 if kind == "f" else np.int64)
    return value.data.dtype


def _store(out: _Value, value: _Value, start: int, stop: int, nulls: threading.Lock) -> None:
    """Rows ``start:stop`` of ``out`` from ``value``; ``nulls`` guards the first NULL mask."""
    assert isinstance(out.data, np.ndarray)
    if not isinstance(value.data, np.ndarray) or _output_type(value) != out.data.dtype:
        raise UnsupportedSQLError("a column whose type changes between rows")
    if value.labels != out.labels:
        raise UnsupportedSQLError("a text column whose values change between rows")
    if value.null is not False and out.data.dtype.kind == "f":
        # NaN under a NULL, as pandas shows a NULL double: here each chunk is still in
        # cache and on its own thread, where a masked write over the whole column after
        # took 0.09 s on one core for 1.5M rows
        null = value.null
        if (
            isinstance(null, np.ndarray)
            and null.shape == value.data.shape
            and value.data.dtype == out.data.dtype == np.float64
        ):
            from rapport.features.kernels import nan_where

            nan_where(null, value.data, out.data[start:stop])
        else:
            out.data[start:stop] = value.data
            np.copyto(out.data[start:stop], np.nan, where=value.null)
    else:
        out.data[start:stop] = value.data
    if value.null is not False:
        with nulls:
            if out.null is False:
                out.null = np.zeros(len(out.data), dtype=bool)
        assert isinstance(out.null, np.ndarray)
        out.null[start:stop] = value.null


def arrow(value: Column) -> pa.Array:
    """A computed column as Arrow, NULLs as nulls."""
    data, null = value.data, value.null
    assert isinstance(data, np.ndarray)
    mask = null if isinstance(null, np.ndarray) and null.any() else None
    if value.labels is not None:
        codes = pa.array(data.astype(np.int32, copy=False), mask=mask)
        text = pa.DictionaryArray.from_arrays(codes, pa.array(value.labels, pa.string()))
        return text.cast(pa.string())
    if value.date:
        return pa.array(data.astype(np.int32, copy=False), mask=mask).cast(pa.date32())
    return pa.array(data, mask=mask)


def _is_float(data: object) -> bool:
    return isinstance(data, float) or (
        isinstance(data, np.ndarray) and np.issubdtype(data.dtype, np.floating)
    )


def _either(*values: _Value) -> np.ndarray | bool:
    nulls = [v.null for v in values if v.null is not False]
    if not nulls:
        return False
    return functools.reduce(np.logical_or, nulls)


def _greater(a: Number, b: Number) -> np.ndarray:
    # DuckDB orders NaN above every number
    out = np.greater(a, b)
    if _is_float(a) or _is_float(b):
        out = out | (np.isnan(a) & ~np.isnan(b))
    return np.asarray(out)


def _equal(a: Number, b: Number) -> np.ndarray:
    # and NaN equal to NaN
    out = np.equal(a, b)
    if _is_float(a) or _is_float(b):
        out = out | (np.isnan(a) & np.isnan(b))
    return np.asarray(out)


_BINARY: dict[type, Callable[[Number, Number], Number]] = {
    exp.Add: np.add,
    exp.Sub: np.subtract,
    exp.Mul: np.multiply,
    exp.Div: np.true_divide,  # DuckDB's `/` divides as DOUBLE: x/0 is +-inf, 0/0 NaN
    exp.GT: _greater,
    exp.LT: lambda a, b: _greater(b, a),
    exp.EQ: _equal,
}


class _Evaluator:
    """Evaluates the items of one ``SELECT`` over ``rows``, each repeated subexpression once."""

    def __init__(self, rows: dict[str, _Value], keys: dict[int, int], length: int) -> None:
        self.rows, self.keys, self.length = rows, keys, length
        self.memo: dict[int, _Value] = {}
        # id(value) -> (value, its data widened); the value is held so its id stays its own
        self.wide: dict[int, tuple[_Value, Number]] = {}

    def select(self, items: tuple[exp.Expression, ...]) -> dict[str, _Value]:
        out: dict[str, _Value] = {}
        for item in items:
            if isinstance(item, exp.Star):
                out.update(self.rows)
            else:
                out[item.alias_or_name] = self.eval(item.unalias())  # type: ignore[arg-type]
        return out

    def eval(self, node: exp.Expression) -> _Value:
        key = self.keys.get(id(node))
        if key is None:
            return self._eval(node)
        if key not in self.memo:
            self.memo[key] = self._eval(node)
        return self.memo[key]

    def _number(self, node: exp.Expression) -> _Value:
        """``node``'s value, refused unless it is a number."""
        value = self.eval(node)
        if value.labels is not None or (value.data is None and value.kept is not None):
            raise UnsupportedSQLError(f"arithmetic on text: {node.sql()}")
        if value.data is None:
            raise UnsupportedSQLError(f"arithmetic on NULL: {node.sql()}")
        return value

    def _numbers(self, node: exp.Expression) -> tuple[_Value, Number]:
        """``node``'s number and its data widened for arithmetic (once per value)."""
        value = self._number(node)
        if id(value) not in self.wide:
            self.wide[id(value)] = (value, _wide(value.data))
        return value, self.wide[id(value)][1]

    def _eval(self, node: exp.Expression) -> _Value:
        kind = type(node)
        if kind in _BINARY:
            (a, x), (b, y) = self._numbers(node.this), self._numbers(node.expression)
            _no_decimal_arithmetic(a, b)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                return _Value(_BINARY[kind](x, y), _either(a, b))
        if isinstance(node, exp.Column):
            if node.name not in self.rows:
                raise UnsupportedSQLError(f"unknown column {node.name}")
            return self.rows[node.name]
        if isinstance(node, exp.Paren):
            return self.eval(node.this)
        if isinstance(node, exp.Literal):
            if node.is_string:
                return _Value(0, labels=(node.this,))
            text = node.this
            if any(ch in text for ch in ".eE"):
                return _Value(float(text), decimal=True)
            return _Value(int(text))
        if isinstance(node, exp.Null):
            return _Value(None, True)
        if isinstance(node, exp.Cast):
            return self._cast(node)
        if isinstance(node, exp.Abs | exp.Sqrt):
            value, x = self._numbers(node.this)
            with np.errstate(invalid="ignore"):
                return _Value(np.abs(x) if isinstance(node, exp.Abs) else np.sqrt(x), value.null)
        if isinstance(node, exp.DateDiff):
            unit = node.args.get("unit")
            if unit is None or unit.name.lower() != "day":
                raise UnsupportedSQLError("DATE_DIFF in a unit other than days")
            (end, x), (start, y) = self._numbers(node.this), self._numbers(node.expression)
            if not (end.date and start.date):
                raise UnsupportedSQLError("DATE_DIFF of other than dates")
            return _Value(np.subtract(x, y, dtype=np.int64), _either(end, start))
        if isinstance(node, exp.Coalesce):
            return self._coalesce([node.this, *node.expressions])
        if isinstance(node, exp.Greatest):
            return self._greatest([node.this, *node.expressions])
        if isinstance(node, exp.Case):
            return self._case(node)
        raise UnsupportedSQLError(kind.__name__)

    def _cast(self, node: exp.Cast) -> _Value:
        value, x = self._numbers(node.this)
        to = node.to.this
        if to == exp.DataType.Type.DOUBLE:
            return _Value(np.asarray(x, dtype=np.float64), value.null)
        if to == exp.DataType.Type.BIGINT and not _is_float(x):
            return _Value(np.asarray(x, dtype=np.int64), value.null)
        # DuckDB rounds doubles to integers half away from zero; nothing here needs it
        raise UnsupportedSQLError(f"CAST to {to}")

    def _coalesce(self, nodes: list[exp.Expression]) -> _Value:
        out = self.eval(nodes[-1])
        for node in reversed(nodes[:-1]):
            # a value without NULLs is the result as it is: widening it (a copy of every
            # count column, chunk by chunk) is left to the store
            value = self._number(node)
            if value.null is False:
                out = value
            elif value.null is not True:
                data: Number = np.where(value.null, out.data, self._numbers(node)[1])
                out = _Value(data, np.logical_and(value.null, out.null))
        return out

    def _greatest(self, nodes: list[exp.Expression]) -> _Value:
        # NULLs are skipped; NULL only where every argument is
        out, x = self._numbers(nodes[0])
        for node in nodes[1:]:
            value, y = self._numbers(node)
            _no_decimal_arithmetic(out, value)
            if value.date != out.date:
                raise UnsupportedSQLError("GREATEST of a date and a number")
            data = np.maximum(x, y)
            if out.null is not False:
                data = np.where(out.null, y, data)
            if value.null is not False:
                data = np.where(value.null, x, data)
            out = _Value(data, np.logical_and(out.null, value.null), date=out.date)
            x = data
        return out

    def _case(self, node: exp.Case) -> _Value:
        if node.this is not None:
            raise UnsupportedSQLError("CASE x WHEN ...")
        default = node.args.get("default")
        out = self.eval(default) if default is not None else _Value(None, True)
        branches = [(self.eval(b.this), self.eval(b.args["true"])) for b in node.args["ifs"]]
        values = [v for _, v in branches] + [out]
        labels: tuple[str, ...] | None = None
        if any(v.labels is not None for v in values):
            if any(v.labels is None and v.data is not None for v in values):
                raise UnsupportedSQLError("CASE mixing text and numbers")
            labels = tuple(dict.fromkeys(t for v in values for t in v.labels or ()))
            values = [_recoded(v, labels) for v in values]
            kind: type = np.int32
        elif any(_is_float(v.data) for v in values):
            _no_decimal_arithmetic(*values)
            kind = np.float64
        elif all(v.data is None for v in values):
            raise UnsupportedSQLError("CASE without a typed branch")
        else:
            kind = np.int64
        from rapport.features.kernels import pick

        out, branch_values = values[-1], values[:-1]
        data = self._column(0 if out.data is None else out.data, kind)
        nulls = [out.null, *(v.null for v in branch_values)]
        null = None if all(n is False for n in nulls) else self._column(out.null, np.bool_)
        for (cond, _), value in zip(reversed(branches), reversed(branch_values), strict=True):
            # a NULL condition is not true
            hit = self._column(cond.data, np.bool_)
            if cond.null is not False:
                hit &= ~np.asarray(cond.null)
            if value.data is not None:
                chosen = np.empty_like(data)
                pick(hit, self._column(value.data, kind), data, chosen)
                data = chosen
            if null is not None:
                chosen = np.empty_like(null)
                pick(hit, self._column(value.null, np.bool_), null, chosen)
                null = chosen
        return _Value(data, False if null is None else null, labels=labels)

    def _column(self, data: Data | np.ndarray | bool, kind: type) -> np.ndarray:
        """``data`` as a contiguous array of ``kind`` and this chunk's length (a copy)."""
        out: np.ndarray = np.empty(self.length, dtype=kind)
        out[...] = data
        return out


def _no_decimal_arithmetic(*values: _Value) -> None:
    """Refuse a DECIMAL literal combined with anything but a DOUBLE column."""
    decimal = any(v.decimal for v in values)
    if decimal and not any(_is_float(v.data) and not v.decimal for v in values):
        raise UnsupportedSQLError("DECIMAL arithmetic (a literal like 0.0 beside integers)")


def _recoded(value: _Value, labels: tuple[str, ...]) -> _Value:
    """A text value's codes in ``labels``, a superset of its own."""
    if value.labels is None:
        return value  # NULL
    if value.labels == labels:
        return value
    where = np.array([labels.index(label) for label in value.labels], dtype=np.int32)
    if isinstance(value.data, int):
        return _Value(int(where[value.data]), value.null, labels=labels)
    assert isinstance(value.data, np.ndarray)
    return _Value(where[value.data], value.null, labels=labels)
