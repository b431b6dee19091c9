"""The fleet page's rows: every box as `redeemd-backend boxes` sees it, sorted, filtered,
searched and paged.

The entries and the filters are backend/boxes_view.py's (`view`, `select`), the same
offline-since, behind and holding the CLI shows; this module adds what a page needs:
a sort on any column, a search, and a keyset cursor (`after`: the sort key of the last
row shown) so the next page starts after that row even while boxes change state, where
an offset would skip or repeat rows.

    >>> query = Query.parse({"sort": "state", "offline": "1", "q": "box-00"})
    >>> page = select(store.box_rows(), query, now)
    >>> page.rows, page.next_after, page.counts
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from backend import boxes_view

OFFLINE_OVER = 3600
"""The "offline > 1 h" filter."""
PAGE = 100
MAX_PAGE = 1000

_STATE_RANK = {"offline": 0, boxes_view.NEVER_SEEN: 1, "online": 2}
_NONE_LAST = (1,)


def _opt(value: Any) -> tuple[Any, ...]:
    """A sortable stand-in for a value that may be None (None after every value)."""
    return _NONE_LAST if value is None else (0, value)


# Each sort key ends with the box id, which is unique: keys never tie, so a keyset
# cursor names exactly one position.
SORTS: dict[str, tuple[str, Callable[[dict[str, Any]], list[Any]]]] = {
    "state": ("State", lambda e: [_STATE_RANK.get(e["state"], 3), e["since"], e["box"]]),
    "box": ("Box", lambda e: [e["box"]]),
    "merchant": ("Merchant", lambda e: [e["merchant"], e["box"]]),
    "last_seen": ("Last seen", lambda e: [*_opt(e["last_seen"]), e["box"]]),
    "behind": ("Cache", lambda e: [*_opt(e["behind"]), e["box"]]),
    "outbox": ("Outbox", lambda e: [*_opt(e["outbox_depth"]), e["box"]]),
    "version": ("Version", lambda e: [*_opt(e["version"]), e["box"]]),
}
DEFAULT_SORT = "state"


class QueryError(ValueError):
    """A fleet query parameter that is not one the page makes; the message says which."""


@dataclass(frozen=True)
class Query:
    sort: str = DEFAULT_SORT
    desc: bool = False
    offline: bool = False
    behind: bool = False
    holding: bool = False
    q: str = ""
    after: tuple[Any, ...] | None = None
    limit: int = PAGE

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Query:
        sort = params.get("sort", DEFAULT_SORT)
        if sort not in SORTS:
            raise QueryError(f"sort={sort!r}: one of {', '.join(SORTS)}")
        try:
            limit = int(params.get("limit", PAGE))
        except ValueError:
            raise QueryError("limit must be a number") from None
        if not 1 <= limit <= MAX_PAGE:
            raise QueryError(f"limit must be 1 to {MAX_PAGE}")
        after = params.get("after") or None
        return cls(
            sort=sort,
            desc=params.get("order") == "desc",
            offline=bool(params.get("offline")),
            behind=bool(params.get("behind")),
            holding=bool(params.get("holding")),
            q=params.get("q", "").strip()[:100],
            after=None if after is None else decode_cursor(after),
            limit=limit,
        )

    def params(self, **changes: Any) -> dict[str, str]:
        """This query as URL parameters (defaults left out), with `changes` applied."""
        query = replace(self, **changes)
        out: dict[str, str] = {}
        if query.sort != DEFAULT_SORT:
            out["sort"] = query.sort
        if query.desc:
            out["order"] = "desc"
        for name in ("offline", "behind", "holding"):
            if getattr(query, name):
                out[name] = "1"
        if query.q:
            out["q"] = query.q
        if query.after is not None:
            out["after"] = encode_cursor(query.after)
        if query.limit != PAGE:
            out["limit"] = str(query.limit)
        return out


def encode_cursor(key: tuple[Any, ...]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[Any, ...]:
    try:
        key = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except ValueError:
        raise QueryError("after= is not a cursor this page made") from None
    if not isinstance(key, list) or not all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in key
    ):
        raise QueryError("after= is not a cursor this page made")
    return tuple(key)


@dataclass(frozen=True)
class Counts:
    total: int
    online: int
    offline: int
    never_seen: int
    behind: int
    holding: int
    matching: int


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    counts: Counts
    next_after: tuple[Any, ...] | None
    """The cursor of the next page, None on the last."""


def counts(entries: list[dict[str, Any]], matching: int) -> Counts:
    states = [e["state"] for e in entries]
    return Counts(
        total=len(entries),
        online=states.count("online"),
        offline=states.count("offline"),
        never_seen=states.count(boxes_view.NEVER_SEEN),
        behind=sum(1 for e in entries if e["behind"]),
        holding=sum(1 for e in entries if e["outbox_depth"]),
        matching=matching,
    )


def _matches(entry: dict[str, Any], q: str) -> bool:
    q = q.casefold()
    return any(q in (entry[k] or "").casefold() for k in ("box", "merchant", "version"))


def select(rows: list[Any], query: Query, now: int) -> Page:
    """One page of `rows` (Store.box_rows()) for `query`."""
    entries = boxes_view.view(rows, now)
    kept = boxes_view.select(
        entries,
        offline=OFFLINE_OVER if query.offline else None,
        behind=query.behind,
        holding=query.holding,
    )
    if query.q:
        kept = [e for e in kept if _matches(e, query.q)]
    key = SORTS[query.sort][1]
    keyed = sorted(((tuple(key(e)), e) for e in kept), key=lambda p: p[0], reverse=query.desc)
    if query.after is not None:
        after = query.after
        keyed = [p for p in keyed if (p[0] < after if query.desc else p[0] > after)]
    shown = keyed[: query.limit]
    next_after = shown[-1][0] if len(keyed) > query.limit else None
    return Page([e for _, e in shown], counts(entries, len(kept)), next_after)
