"""Scoring posted histories: features from raw events, by the training feature code.

:class:`HistoryFeatures` checks a history request's bounds (id lengths, event counts),
turns its events into the feature code's tables, runs that code on one DuckDB connection
within the request's time budget, and ranks the R/F/M scores within the served snapshot.
:class:`~rapport.serving.core.ServiceState` scores the rows it returns.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import numpy as np
import pandas as pd

from rapport.features.build import build_features, connect
from rapport.features.contracts import DataValidationError, validate_table
from rapport.features.segments import scores_against
from rapport.serving import schemas as s
from rapport.serving.errors import InputError, long_id, too_long
from rapport.serving.limits import Deadline
from rapport.serving.scoring import Scorer
from rapport.serving.settings import ServingSettings

#: A stand-in customer with one interaction and no purchase: gives a posted history without
#: interactions the interaction columns a customer without activity gets in training.
_NOBODY = "\x00rapport-nobody"

#: One posted interaction as a table row: customer, time, channel, event.
_IxRow = tuple[str, pd.Timestamp, str, str]


class HistoryFeatures:
    """Features of posted histories, on one DuckDB connection of their own.

    Parameters
    ----------
    settings
        The request bounds (ids, events per customer and per request).
    """

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        #: Held while the connection runs a query (connections are not thread-safe).
        self.lock = threading.Lock()
        self._con: Any = None

    def check_bounds(self, request: s.HistoryRequest) -> None:
        """Id lengths and the request's event count, checked before any work starts."""
        errors: list[dict[str, Any]] = []
        limit = self.settings.max_id_length
        events = 0
        for i, cust in enumerate(request.customers):
            loc = ["body", "customers", i]
            if too_long(cust.customer_id, limit):
                errors.append(long_id([*loc, "customer_id"], limit))
            errors += [
                long_id([*loc, "transactions", j, "order_id"], limit)
                for j, p in enumerate(cust.transactions)
                if too_long(p.order_id, limit)
            ]
            events += len(cust.transactions) + len(cust.interactions)
        most = self.settings.max_request_events
        if events > most:
            errors.append(
                {
                    "loc": ["body", "customers"],
                    "msg": f"at most {most} events per request (got {events}; "
                    "RAPPORT_MAX_REQUEST_EVENTS)",
                    "type": "too_long",
                }
            )
        if errors:
            raise InputError(errors)

    def _rows(
        self,
        request: s.HistoryRequest,
        as_of: dt.date,
        errors: list[dict[str, Any]],
        deadline: Deadline,
    ) -> tuple[list[tuple[str, pd.Timestamp, float, str | None]], list[_IxRow]]:
        """The posted events as table rows; what is wrong with them goes to ``errors``."""
        limit = self.settings.max_events
        end = pd.Timestamp(as_of) + pd.Timedelta(days=1)
        tx_rows: list[tuple[str, pd.Timestamp, float, str | None]] = []
        ix_rows: list[_IxRow] = []
        seen: set[str] = set()
        for i, cust in enumerate(request.customers):
            deadline.check()
            loc = ["body", "customers", i]
            if cust.customer_id in seen:
                errors.append(
                    {
                        "loc": [*loc, "customer_id"],
                        "msg": "repeated customer",
                        "type": "value_error",
                    }
                )
            seen.add(cust.customer_id)
            if len(cust.transactions) + len(cust.interactions) > limit:
                errors.append(
                    {
                        "loc": loc,
                        "msg": f"at most {limit} events per customer (RAPPORT_MAX_EVENTS)",
                        "type": "too_long",
                    }
                )
                continue
            tx = [
                (cust.customer_id, _utc_naive(p.timestamp), p.amount, p.order_id)
                for p in cust.transactions
            ]
            ix = [
                (cust.customer_id, _utc_naive(e.timestamp), e.channel.lower(), e.event.lower())
                for e in cust.interactions
            ]
            for field, rows in (("transactions", tx), ("interactions", ix)):
                errors += [
                    {
                        "loc": [*loc, field, j, "timestamp"],
                        "msg": f"{row[1]} is after as_of {as_of}",
                        "type": "future",
                    }
                    for j, row in enumerate(rows)
                    if row[1] >= end
                ]
            tx_rows += tx
            ix_rows += ix
        return tx_rows, ix_rows

    def features(
        self,
        request: s.HistoryRequest,
        scorer: Scorer,
        reference: pd.DataFrame | None,
        as_of: dt.date,
        errors: list[dict[str, Any]],
        deadline: Deadline,
    ) -> pd.DataFrame:
        """Feature rows of the posted customers, in the request's order.

        Parameters
        ----------
        request
            The histories (their bounds already checked with :meth:`check_bounds`).
        scorer
            The served models, whose windows and interaction pairs the features follow.
        reference
            The snapshot rows that R/F/M scores rank in (None: the feature code's own).
        as_of
            The cutoff date.
        errors
            What the caller found wrong so far; raised with what is found here.
        deadline
            The request's time budget.

        Raises
        ------
        InputError
            Naming every bad customer and event.
        BudgetExceededError
            When ``deadline`` runs out (the feature query is interrupted).
        """
        tx_rows, ix_rows = self._rows(request, as_of, errors, deadline)
        if errors:
            raise InputError(errors)
        tx = pd.DataFrame(tx_rows, columns=["customer_id", "timestamp", "amount", "order_id"])
        pairs = scorer.interaction_pairs
        if pairs is None:
            pairs = tuple(sorted({(c, e) for _, _, c, e in ix_rows}))
        ix: pd.DataFrame | None = None
        if pairs:
            first_channel, first_event = pairs[0]
            ix_rows.append((_NOBODY, pd.Timestamp(as_of), first_channel, first_event))
            ix = pd.DataFrame(ix_rows, columns=["customer_id", "timestamp", "channel", "event"])
        try:
            # A posted line has no product or line number, so two equal lines are two lines
            # of one order, not a duplicate: kept, then summed into their order.
            tx = validate_table(tx, "transactions", duplicates="keep")
            deadline.check()
            frame = self._within(tx, ix, scorer, as_of, pairs, deadline)
        except DataValidationError as err:
            raise InputError(
                [{"loc": ["body", "customers"], "msg": str(err), "type": "value_error"}]
            ) from err
        deadline.check()
        return _ranked_in_request_order(frame, request, scorer, reference, as_of)

    def _within(
        self,
        tx: pd.DataFrame,
        ix: pd.DataFrame | None,
        scorer: Scorer,
        as_of: dt.date,
        pairs: tuple[tuple[str, str], ...],
        deadline: Deadline,
    ) -> pd.DataFrame:
        """The feature code on the posted events, stopped when ``deadline`` runs out.

        One DuckDB connection runs one query at a time (connections are not thread-safe):
        waiting for it counts against the budget, and a timer interrupts the query itself
        when the budget runs out, so an abandoned request stops holding memory and the
        connection.
        """
        import duckdb

        if not self.lock.acquire(timeout=deadline.remaining()):
            raise deadline.exceeded()
        try:
            if self._con is None:
                self._con = connect(threads=1)
            timer = threading.Timer(deadline.remaining(), self._con.interrupt)
            timer.daemon = True
            timer.start()
            try:
                return build_features(
                    tx,
                    ix,
                    as_of=[as_of],
                    windows=scorer.windows,
                    interaction_pairs=pairs,
                    validate=True,
                    connection=self._con,
                )
            except duckdb.InterruptException as err:
                raise deadline.exceeded() from err
            finally:
                # Cancelled and joined under the lock: an interrupt never reaches the next
                # request's query.
                timer.cancel()
                timer.join()
        finally:
            self.lock.release()


def _ranked_in_request_order(
    frame: pd.DataFrame,
    request: s.HistoryRequest,
    scorer: Scorer,
    reference: pd.DataFrame | None,
    as_of: dt.date,
) -> pd.DataFrame:
    """Feature rows of the posted customers, R/F/M-scored against the snapshot."""
    frame = frame[frame["customer_id"].astype("string") != _NOBODY].reset_index(drop=True)
    # The feature code counts a customer from the first purchase (refunds alone are not
    # one); such a history has no feature row, and the answer says which.
    present = set(frame["customer_id"].astype("string"))
    absent = [
        {
            "loc": ["body", "customers", i, "transactions"],
            "msg": f"no purchase on or before {as_of} (refunds alone do not count)",
            "type": "value_error",
        }
        for i, cust in enumerate(request.customers)
        if cust.customer_id not in present
    ]
    if absent:
        raise InputError(absent)
    missing_cols = [c for c in scorer.inputs if c not in frame.columns]
    for c in missing_cols:
        frame[c] = np.nan
    if reference is not None and not frame.empty:
        scored = scores_against(frame, reference)
        for c in scored.columns:
            frame[c] = scored[c]
    order = {c.customer_id: i for i, c in enumerate(request.customers)}
    frame = frame.assign(_order=frame["customer_id"].astype("string").map(order))
    return frame.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def _utc_naive(ts: dt.datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(ts)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp
