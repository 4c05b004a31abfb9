"""Reading the traffic store back: requests in time order, each with its shadow comparisons."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from router.config import StoreConfig
from router.records import ShadowRecord
from router.store.database import Database
from router.store.schema import StoredRequest, request_from_row, shadow_from_row

__all__ = ["read_traffic"]

# Requests fetched per query; each page's shadows come with one more.
PAGE = 1000


def read_traffic(
    store: StoreConfig, since: float | None = None, until: float | None = None
) -> Iterator[StoredRequest]:
    """Every stored request with `since <= ts < until` (unix seconds; None = unbounded), oldest first.

    Each comes with the shadow comparisons its gateway process recorded under its
    request id. Reads page by page on a connection of its own, so it can run while
    gateways write; yields nothing when a SQLite store has no file yet.
    """
    db = Database.connect(store, create=False)
    if db is None:
        return
    try:
        after: tuple[float, str, int] | None = None
        while True:
            rows = db.requests_page(since, until, after, PAGE)
            if not rows:
                return
            last = rows[-1]
            after = (last[2], last[0], last[1])
            shadows: defaultdict[tuple[str, str], list[ShadowRecord]] = defaultdict(list)
            for srow in db.shadows_for(sorted({row[3] for row in rows})):
                shadows[srow[0], srow[2]].append(shadow_from_row(srow[1:]))
            for row in rows:
                stored = request_from_row(row[2:])
                stored.shadows = shadows.get((row[0], stored.request_id), [])
                yield stored
    finally:
        db.close()
