"""Compiled single-pass kernels behind the grid engine (:mod:`rapport.features.grid`).

Each kernel reads the event rows once and writes every base aggregate of every (customer,
cutoff) straight into its place in the output: no temporary array per aggregate, window or
mark, which on this class of machine cost more in fresh memory pages than in arithmetic.
numba compiles them on first use and caches the machine code beside this file.

The outputs are matrices, one row per aggregate and one column per feature row of the batch
of cutoffs (cutoff by cutoff, customers in code order): the layout of
:func:`rapport.features.grid.grid_tables`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from rapport.features.day_sentinels import NO_DAY, NO_PURCHASE


@njit(cache=True, nogil=True)
def _rank(day: np.ndarray, is_purchase: np.ndarray, i: int) -> np.int64:
    """Row ``i``'s place within its customer: by day, a day's purchases before its refunds."""
    return 2 * np.int64(day[i]) + (not is_purchase[i])


@njit(cache=True, nogil=True)
def _ranks(day: np.ndarray, is_purchase: np.ndarray) -> np.ndarray:
    """:func:`_rank` of every row."""
    out = np.empty(len(day), dtype=np.int64)
    for i in range(len(day)):
        out[i] = _rank(day, is_purchase, i)
    return out


@njit(cache=True, nogil=True)
def is_grouped(code: np.ndarray, day: np.ndarray, is_purchase: np.ndarray) -> bool:
    """Whether the rows come ordered by code, then :func:`_rank`."""
    for i in range(1, len(code)):
        if code[i] < code[i - 1] or (
            code[i] == code[i - 1] and _rank(day, is_purchase, i) < _rank(day, is_purchase, i - 1)
        ):
            return False
    return True


@njit(cache=True, nogil=True)
def sort_within(
    code: np.ndarray, day: np.ndarray, amount: np.ndarray, is_purchase: np.ndarray, limit: int
) -> bool:
    """Sort each customer's rows by :func:`_rank` in place, where the codes ascend.

    Rows that come grouped by customer are mostly in order already: a refund listed before
    a purchase of its day puts about one customer in a thousand out of it. Sorting those
    few rows where they lie spares sorting every row (:func:`by_code`, 0.5 s at 10M rows,
    against 0.04 s). False, changing nothing, where a code falls from one row to the next
    or more than ``limit`` customers are out of order.
    """
    m = len(code)
    # the spans to sort, found before anything moves
    spans = np.empty(2 * (limit + 1), dtype=np.int64)
    k, start = 0, 0
    disordered = False
    for i in range(1, m + 1):
        if i == m or code[i] != code[start]:
            if i < m and code[i] < code[start]:
                return False
            if disordered:
                if k == limit:
                    return False
                spans[2 * k], spans[2 * k + 1] = start, i
                k += 1
            start, disordered = i, False
        elif _rank(day, is_purchase, i) < _rank(day, is_purchase, i - 1):
            disordered = True
    for s in range(k):
        a, b = spans[2 * s], spans[2 * s + 1]
        by_key = np.argsort(_ranks(day[a:b], is_purchase[a:b]), kind="mergesort")  # stable
        day[a:b] = day[a:b][by_key]
        amount[a:b] = amount[a:b][by_key]
        is_purchase[a:b] = is_purchase[a:b][by_key]
    return True


@njit(cache=True, nogil=True)
def _radix_pass(
    key: np.ndarray,
    amount: np.ndarray,
    shift: int,
    bits: int,
    to_key: np.ndarray,
    to_amount: np.ndarray,
) -> None:
    """One stable counting pass of the rows by ``bits`` bits of ``key`` from ``shift`` up.

    ``amount`` moves with the key, unless it is empty (the key holds the whole row).
    """
    carry = len(amount) > 0
    width = 1 << bits
    starts = np.zeros(width + 1, dtype=np.int64)
    for i in range(len(key)):
        starts[((key[i] >> shift) & (width - 1)) + 1] += 1
    for b in range(width):
        starts[b + 1] += starts[b]
    for i in range(len(key)):
        b = (key[i] >> shift) & (width - 1)
        at = starts[b]
        starts[b] += 1
        to_key[at] = key[i]
        if carry:
            to_amount[at] = amount[i]


@njit(cache=True, nogil=True)
def _bit_length(value: int | np.integer) -> int:
    """How many bits ``value`` (>= 0) takes: 0 for 0."""
    bits = 0
    while value >> bits:
        bits += 1
    return bits


#: Bits per radix pass: 32 runs per array stay in cache on this class of machine, where 256
#: took 0.125 s a pass against 0.05 s (10M rows, two arrays moved).
RADIX_BITS = 5


@njit(cache=True, nogil=True)
def by_code(
    code: np.ndarray, day: np.ndarray, amount: np.ndarray, is_purchase: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The transaction rows stably sorted by (code, day, refund), as the kernel reads them.

    Each row becomes one 64-bit key (code above, day and refund below) moved with its
    amount by a least-significant-digit radix sort of :data:`RADIX_BITS` bits a pass (the
    key's bits only: about 34 for 1.8M customers over a few years of days): every
    pass reads and writes in order but for a few dozen runs, where a counting sort by code
    wrote each row to one of 1.8M places and a gather read each from anywhere (1.2 s for 10M
    rows in random order, against about 0.5 s).
    """
    m = len(code)
    if m == 0:
        return code.copy(), day.copy(), amount.copy(), is_purchase.copy()
    lo, hi = np.int64(day.min()), np.int64(day.max())
    day_bits = _bit_length(2 * (hi - lo) + 1)  # up to 33 for days at int32's ends
    code_bits = _bit_length(n - 1)
    if day_bits + code_bits > 63:
        # more customers than a key holds beside the days: two stable sorts
        by_day = np.argsort(_ranks(day, is_purchase), kind="mergesort")
        rows = by_day[np.argsort(code[by_day], kind="mergesort")]
        return code[rows], day[rows], amount[rows], is_purchase[rows]
    key = np.empty(m, dtype=np.int64)
    for i in range(m):
        key[i] = (np.int64(code[i]) << day_bits) | (_rank(day, is_purchase, i) - 2 * lo)
    spare = np.empty(m, dtype=np.int64)
    amounts = (np.empty(m, dtype=amount.dtype), np.empty(m, dtype=amount.dtype))
    src_key, src_amount, dst_key, turn = key, amount, spare, 0
    done = 0
    while done < day_bits + code_bits:
        bits = min(RADIX_BITS, day_bits + code_bits - done)
        _radix_pass(src_key, src_amount, done, bits, dst_key, amounts[turn])
        # the caller's amounts are read once, never written
        src_key, src_amount, dst_key = dst_key, amounts[turn], src_key
        turn = 1 - turn
        done += bits
    out_code = np.empty(m, dtype=code.dtype)
    out_day = np.empty(m, dtype=day.dtype)
    out_flag = np.empty(m, dtype=is_purchase.dtype)
    low = (np.int64(1) << day_bits) - 1
    for i in range(m):
        k = src_key[i]
        rank = k & low
        out_code[i] = k >> day_bits
        out_day[i] = (rank >> 1) + lo
        out_flag[i] = (rank & 1) == 0
    # the day's width is at least one bit, so a pass ran and the amounts are a copy
    return out_code, out_day, src_amount, out_flag


@njit(cache=True, nogil=True)
def codes_ascend(code: np.ndarray) -> bool:
    """Whether the codes never fall from one row to the next."""
    for i in range(1, len(code)):  # noqa: SIM110
        if code[i] < code[i - 1]:
            return False
    return True


@njit(cache=True, nogil=True)
def by_customer(
    code: np.ndarray, day: np.ndarray, combo: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The interaction rows of known customers (code >= 0), stably sorted by code.

    The interaction kernel adds each row to its customer's columns: rows in code order write
    column after column, where rows in time order (or any other) jump across the output.
    Each row is packed into one 64-bit key (code, day, combination) that radix passes over
    the code's bits move whole: 0.39 s for 12.6M rows in random order, where a counting
    sort that scattered three arrays to 1.8M places took 0.58 s. The counting sort still
    does it where the three do not fit in 63 bits.
    """
    m = len(code)
    kept, lo, hi, top = 0, np.int64(0), np.int64(0), np.int64(0)
    for i in range(m):
        if code[i] >= 0:
            d = np.int64(day[i])
            if kept == 0 or d < lo:
                lo = d
            if kept == 0 or d > hi:
                hi = d
            top = max(top, np.int64(combo[i]))
            kept += 1
    combo_bits, day_bits, code_bits = _bit_length(top), _bit_length(hi - lo), _bit_length(n - 1)
    if combo_bits + day_bits + code_bits > 63:
        return _counting_by_customer(code, day, combo, n, kept)
    low = combo_bits + day_bits
    key = np.empty(kept, dtype=np.int64)
    j = 0
    for i in range(m):
        if code[i] >= 0:
            rest = ((np.int64(day[i]) - lo) << combo_bits) | np.int64(combo[i])
            key[j] = (np.int64(code[i]) << low) | rest
            j += 1
    spare = np.empty(kept, dtype=np.int64)
    nothing = np.empty(0, dtype=np.float64)
    done = 0
    while done < code_bits:
        bits = min(RADIX_BITS, code_bits - done)
        _radix_pass(key, nothing, low + done, bits, spare, nothing)
        key, spare = spare, key
        done += bits
    sorted_code = np.empty(kept, dtype=code.dtype)
    sorted_day = np.empty(kept, dtype=day.dtype)
    sorted_combo = np.empty(kept, dtype=combo.dtype)
    day_mask = (np.int64(1) << day_bits) - 1
    combo_mask = (np.int64(1) << combo_bits) - 1
    for i in range(kept):
        k = key[i]
        sorted_code[i] = k >> low
        sorted_day[i] = ((k >> combo_bits) & day_mask) + lo
        sorted_combo[i] = k & combo_mask
    return sorted_code, sorted_day, sorted_combo


@njit(cache=True, nogil=True)
def _counting_by_customer(
    code: np.ndarray, day: np.ndarray, combo: np.ndarray, n: int, kept: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`by_customer` by one counting sort, for keys too wide to pack."""
    starts = np.zeros(n + 1, dtype=np.int64)
    for i in range(len(code)):
        if code[i] >= 0:
            starts[code[i] + 1] += 1
    for c in range(n):
        starts[c + 1] += starts[c]
    sorted_code = np.empty(kept, dtype=code.dtype)
    sorted_day = np.empty(kept, dtype=day.dtype)
    sorted_combo = np.empty(kept, dtype=combo.dtype)
    for i in range(len(code)):
        c = code[i]
        if c >= 0:
            at = starts[c]
            starts[c] += 1
            sorted_code[at] = c
            sorted_day[at] = day[i]
            sorted_combo[at] = combo[i]
    return sorted_code, sorted_day, sorted_combo


@njit(cache=True, nogil=True)
def positions(first_k: np.ndarray, j0: int, j1: int, offsets: np.ndarray) -> np.ndarray:
    """Each customer's column at each cutoff ``j0 <= j < j1`` (-1 where it has none).

    A customer has a column from its first cutoff ``first_k`` on, the columns of a cutoff
    following customer codes.
    """
    out = np.full((j1 - j0, len(first_k)), -1, dtype=np.int64)
    nxt = offsets[:-1].copy()
    for c in range(len(first_k)):
        for j in range(max(first_k[c], j0), j1):
            out[j - j0, c] = nxt[j - j0]
            nxt[j - j0] += 1
    return out


@njit(cache=True, nogil=True)
def first_purchase_days(
    code: np.ndarray, day: np.ndarray, is_purchase: np.ndarray, n: int
) -> np.ndarray:
    """Each customer's first purchase day, ``NO_PURCHASE`` for none."""
    first = np.full(n, NO_PURCHASE, dtype=np.int32)
    for i in range(len(code)):
        if is_purchase[i] and day[i] < first[code[i]]:
            first[code[i]] = day[i]
    return first


@njit(cache=True, nogil=True)
def transaction_kernel(
    code: np.ndarray,
    day: np.ndarray,
    amount: np.ndarray,
    is_purchase: np.ndarray,
    first_k: np.ndarray,
    cutoff_days: np.ndarray,
    spans: np.ndarray,
    j0: int,
    j1: int,
    offsets: np.ndarray,
    ints: np.ndarray,
    floats: np.ndarray,
) -> None:
    """The transaction aggregates of cutoffs ``j0 <= j < j1``.

    The rows must be grouped by code, then day, a day's purchases before its refunds (see
    :func:`sort_within` and :func:`by_code`). Each
    customer's rows are walked once while the cutoffs advance; the purchase-day marks of
    :func:`rapport.features.definitions._rows_sql` are made on the way (a new purchase day,
    its gap from the one before, repeat-day rows) and window sums are the customer's
    running sums less those of the rows a trailing pointer per span has left behind.

    ``ints`` rows: first_day, last_day, purchase days, purchase rows, then purchase rows per
    span; ``floats`` rows: total, repeat-day, order spend, order spend squared, squared gaps,
    then spend per span. Column ``offsets[j - j0] + r`` is the ``r``-th present customer of
    cutoff ``j``.
    """
    n_spans = len(spans)
    nxt = offsets[:-1].copy()
    n_rows = len(code)
    # per span: the first row still inside the window, and the purchases and spend before it
    trail = np.zeros(n_spans, dtype=np.int64)
    left_buys = np.zeros(n_spans, dtype=np.int64)
    left_spend = np.zeros(n_spans, dtype=np.float64)
    s = 0
    while s < n_rows:
        c = code[s]
        e = s
        while e < n_rows and code[e] == c:
            e += 1
        fk = first_k[c]
        if fk < j1:
            first = NO_PURCHASE
            prev_buy = NO_DAY
            last = NO_DAY
            n_days = 0
            n_buys = 0
            total = 0.0
            repeat = 0.0
            order_spend = 0.0
            order_sq = 0.0
            gap_sq = 0.0
            trail[:] = s
            left_buys[:] = 0
            left_spend[:] = 0.0
            i = s
            for j in range(max(fk, j0), j1):
                cj = cutoff_days[j]
                while i < e and day[i] <= cj:
                    d = day[i]
                    a = amount[i]
                    if is_purchase[i]:
                        if first == NO_PURCHASE:
                            first = d
                        if prev_buy != d:
                            n_days += 1
                            if prev_buy != NO_DAY:
                                g = float(d - prev_buy)
                                gap_sq += g * g
                        prev_buy = d
                        last = d
                        n_buys += 1
                        order_spend += a
                        order_sq += a * a
                        if d > first:
                            repeat += a
                    elif d > first and prev_buy == d:
                        repeat += a
                    total += a
                    i += 1
                col = nxt[j - j0]
                nxt[j - j0] += 1
                ints[0, col] = first
                ints[1, col] = last
                ints[2, col] = n_days
                ints[3, col] = n_buys
                floats[0, col] = total
                floats[1, col] = repeat
                floats[2, col] = order_spend
                floats[3, col] = order_sq
                floats[4, col] = gap_sq
                for t in range(n_spans):
                    edge = cj - spans[t]
                    while trail[t] < i and day[trail[t]] <= edge:
                        r = trail[t]
                        left_buys[t] += is_purchase[r]
                        left_spend[t] += amount[r]
                        trail[t] += 1
                    ints[4 + t, col] = n_buys - left_buys[t]
                    floats[5 + t, col] = total - left_spend[t]
        s = e


@njit(cache=True, nogil=True)
def interaction_kernel(
    code: np.ndarray,
    day: np.ndarray,
    combo: np.ndarray,
    pair: np.ndarray,
    channel: np.ndarray,
    response: np.ndarray,
    complaint: np.ndarray,
    first_k: np.ndarray,
    position: np.ndarray,
    cutoff_days: np.ndarray,
    windows: np.ndarray,
    n_pairs: int,
    n_channels: int,
    j0: int,
    j1: int,
    out: np.ndarray,
) -> None:
    """The interaction aggregates of cutoffs ``j0 <= j < j1``, rows in any order.

    A row's codes are those of its (channel, event) combination ``combo``: ``pair``,
    ``channel``, ``response`` and ``complaint`` are tables over the combinations.

    Every aggregate is a count or a latest day, so each row adds itself to each cutoff that
    sees it. ``position[j - j0, c]`` is customer ``c``'s column at cutoff ``j`` (``-1`` when
    absent). ``out`` rows: pair counts (pair-major, window-minor), latest day per channel,
    responses and complaints per window, latest response and complaint, responses per
    channel in the longest window; day rows start at ``NO_DAY``, counts at 0.
    """
    n_windows = len(windows)
    longest = windows.max()
    base_last = n_pairs * n_windows
    base_resp = base_last + n_channels
    base_compl = base_resp + n_windows
    row_last_resp = base_compl + n_windows
    row_last_compl = row_last_resp + 1
    base_ch_resp = row_last_compl + 1
    for i in range(len(code)):
        c = code[i]
        if c < 0:
            continue
        d = day[i]
        # the first cutoff on or after the day; cutoffs are few, a scan is enough
        j = j0
        if first_k[c] > j:
            j = first_k[c]
        while j < j1 and cutoff_days[j] < d:
            j += 1
        k = combo[i]
        p = pair[k]
        ch = channel[k]
        resp = response[k]
        compl = complaint[k]
        while j < j1:
            col = position[j - j0, c]
            age = cutoff_days[j] - d
            for g in range(n_windows):
                if age < windows[g]:
                    if p < n_pairs:
                        out[p * n_windows + g, col] += 1
                    if resp:
                        out[base_resp + g, col] += 1
                    if compl:
                        out[base_compl + g, col] += 1
            if ch >= 0:
                if d > out[base_last + ch, col]:
                    out[base_last + ch, col] = d
                if resp and age < longest:
                    out[base_ch_resp + ch, col] += 1
            if resp and d > out[row_last_resp, col]:
                out[row_last_resp, col] = d
            if compl and d > out[row_last_compl, col]:
                out[row_last_compl, col] = d
            j += 1


@njit(cache=True, nogil=True)
def mark_ids(values: np.ndarray, lo: int, seen: np.ndarray) -> None:
    """``seen[v - lo] = True`` for every id ``v`` (a customer coder's table, one pass)."""
    for i in range(len(values)):
        seen[values[i] - lo] = True


@njit(cache=True, nogil=True)
def lookup_ids(values: np.ndarray, lo: int, table: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``table[v - lo]`` of every id ``v``, -1 where it falls outside the table (one pass).

    Written into ``out``, which may be ``values`` itself.
    """
    n = len(table)
    for i in range(len(values)):
        at = values[i] - lo
        out[i] = table[at] if 0 <= at < n else -1
    return out


@njit(cache=True, nogil=True)
def combine(
    channel: np.ndarray,
    event: np.ndarray,
    n_events: int,
    table: np.ndarray,
    out: np.ndarray,
    held: np.ndarray,
) -> None:
    """``out[i] = table[channel[i] * n_events + event[i]]``, each row's combination number.

    ``held`` marks the numbers the rows hold (the interaction pairs found as rows are read).
    """
    for i in range(len(out)):
        k = table[channel[i] * n_events + event[i]]
        out[i] = k
        held[k] = True


@njit(cache=True, nogil=True)
def pick(hit: np.ndarray, yes: np.ndarray, no: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = yes[i] if hit[i] else no[i]``, as a SQL ``CASE`` picks.

    numpy's ``where`` branches on every row, about ten times slower on rows that hit at
    random; this compiles to a blend. ``out`` must not be ``yes`` or ``no`` (the compiler
    cannot tell they do not overlap, and then loops row by row).
    """
    for i in range(len(out)):
        out[i] = yes[i] if hit[i] else no[i]


@njit(cache=True, nogil=True)
def nan_where(null: np.ndarray, values: np.ndarray, out: np.ndarray) -> None:
    """``values`` into ``out``, NaN where ``null``: a NULL double as pandas shows it.

    Twelve times faster than numpy's masked copy, which goes element by element through a
    generic strided transfer.
    """
    for i in range(len(out)):
        out[i] = np.nan if null[i] else values[i]


def warm() -> None:
    """Load (or compile, the first time) every kernel for the types the engine passes.

    Dispatch is by argument types, so these are the engine's: int64 codes, int32 days,
    float64 amounts, bool flags, uint16 combinations, int32 codes of pairs and channels,
    int32 counts.
    """
    i64, i32 = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int32)
    flag = np.zeros(1, dtype=bool)
    is_grouped(i64, i32, flag)
    sort_within(i64, i32, np.zeros(1), flag, 1)
    by_code(i64, i32, np.zeros(1), flag, 1)
    first_purchase_days(i64, i32, flag, 1)
    offsets = np.array([0, 1], dtype=np.int64)
    position = positions(i64, 0, 1, offsets)
    ints, floats = np.zeros((5, 1), dtype=np.int32), np.zeros((6, 1))
    transaction_kernel(i64, i32, np.zeros(1), flag, i64, i64, i64 + 1, 0, 1, offsets, ints, floats)
    counts = np.zeros((8, 1), dtype=np.int32)
    combo = np.zeros(1, dtype=np.uint16)
    codes_ascend(i64)
    by_customer(i64, i32, combo, 1)
    interaction_kernel(
        i64, i32, combo, i32, i32, flag, flag, i64, position, i64, i64 + 1, 1, 1, 0, 1, counts
    )
    for values in (np.zeros(1), i64, i32, flag):
        pick(flag, values, values, values.copy())
    nan_where(flag, np.zeros(1), np.zeros(1))
    mark_ids(i64, 0, flag.copy())
    lookup_ids(i64, 0, i64, i64.copy())
    # dictionary indices come from Arrow read-only, a type of their own to numba
    indices = np.zeros(1, dtype=np.int32)
    indices.flags.writeable = False
    combine(indices, indices, 1, combo, combo.copy(), flag.copy())
