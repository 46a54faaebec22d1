"""Thin resolvers of the GraphQL gateway: turn arguments into a ``Page`` and filters, and ask the
operation's ``RequestData`` (``graphql_gateway.data``) for rows. No SQL here.

One habit for speed, not for SQL: a list field loads the to-one relations its rows select (a
match's ``job``) as soon as the list arrives (``_with_parents``, one batch for all parents, the
same statement the rows' own resolvers would cause), so those resolve synchronously from
``RequestData.loaded``; graphql-core completes a row without pending futures about twice as fast,
and ``executor.RowExecutionContext`` completes such a relation without calling its resolver at all
(``parent`` marks its resolvers with the ``relation`` they read).

``OperationContext`` is the ``context_value`` of every operation: the data access of this
operation, the page-size settings and, for subscriptions, the change feed.
"""
from __future__ import annotations

from asyncio import Future
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    FieldNode,
    GraphQLError,
    GraphQLObjectType,
    GraphQLResolveInfo,
    get_named_type,
)

from config.settings import GraphQLSettings

from .data import COLUMNS, Filter, Page, PageError, RequestData, Row


@dataclass(slots=True)
class OperationContext:
    """What one operation's resolvers share."""

    settings: GraphQLSettings
    new_data: Callable[[], RequestData]
    feed: Any = None  # agent.webhooks.feed.ChangeFeed, when the webhook emitter runs
    data: RequestData = field(init=False)

    def __post_init__(self) -> None:
        self.data = self.new_data()

    def renew(self) -> None:
        """Fresh loaders (for the next event of a subscription: no rows cached from the last)."""
        self.data.cancel()  # what the last event left running (a sibling of a field that failed)
        self.data = self.new_data()


def _ctx(info: GraphQLResolveInfo) -> OperationContext:
    ctx: OperationContext = info.context
    return ctx


BIGINT_MAX = 2**63 - 1


def parse_id(value: Any, argument: str = "id") -> int:
    """An ``ID`` argument as the bigint it names; a GraphQL error when it is not one."""
    text = str(value)
    # ASCII digits only: str.isdigit() is also true for "²" (which int() refuses: an internal
    # error) and "١٢" (which int() reads as 12)
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > BIGINT_MAX:
        raise GraphQLError(f"{argument} must be a numeric id, got {text[:40]!r}")
    return int(text)


def _page(info: GraphQLResolveInfo, first: int | None, after: Any, order: str = "id") -> Page:
    settings = _ctx(info).settings
    page = Page(settings.default_page_size if first is None else first,
                None if after is None else parse_id(after, "after"), order)
    try:
        page.check(settings.max_page_size)
    except PageError as exc:
        raise GraphQLError(str(exc), extensions={"code": "PAGE_SIZE_LIMIT", "limit": "max_page_size"}) from None
    return page


async def _rows(info: GraphQLResolveInfo, table: str, page: Page, filters: list[Filter] | None = None) -> list[Row]:
    """A top-level list, with the to-one relations its rows select loaded in one batch (``children``)."""
    data = _ctx(info).data
    rows = await data.rows(table, page, filters or ())
    wanted = _parents_selected(info)
    return await _with_parents(data, rows, wanted) if wanted else rows


def _order(order: str | None) -> str:
    return (order or "ID").lower()


# ----------------------------------------------------------------------------- Query
async def user(_root: Any, info: GraphQLResolveInfo, id: Any) -> Row | None:
    return await _ctx(info).data.get("users", parse_id(id))


async def users(_root: Any, info: GraphQLResolveInfo, first: int | None = None, after: Any = None,
                email: str | None = None) -> list[Row]:
    filters = [Filter("email", "eq", email)] if email is not None else []
    return await _rows(info, "users", _page(info, first, after), filters)


async def resume(_root: Any, info: GraphQLResolveInfo, id: Any) -> Row | None:
    return await _ctx(info).data.get("resumes", parse_id(id))


async def resumes(_root: Any, info: GraphQLResolveInfo, first: int | None = None, after: Any = None,
                  user_id: Any = None) -> list[Row]:
    filters = [Filter("user_id", "eq", parse_id(user_id, "user_id"))] if user_id is not None else []
    return await _rows(info, "resumes", _page(info, first, after), filters)


async def job(_root: Any, info: GraphQLResolveInfo, id: Any) -> Row | None:
    return await _ctx(info).data.get("jobs", parse_id(id))


async def jobs(_root: Any, info: GraphQLResolveInfo, first: int | None = None, after: Any = None,
               company_id: Any = None) -> list[Row]:
    filters = [Filter("company_id", "eq", parse_id(company_id, "company_id"))] if company_id is not None else []
    return await _rows(info, "jobs", _page(info, first, after), filters)


async def company(_root: Any, info: GraphQLResolveInfo, id: Any) -> Row | None:
    return await _ctx(info).data.get("companies", parse_id(id))


async def companies(_root: Any, info: GraphQLResolveInfo, first: int | None = None, after: Any = None) -> list[Row]:
    return await _rows(info, "companies", _page(info, first, after))


def _match_filters(min_score: float | None) -> list[Filter]:
    return [Filter("match_score", "ge", min_score)] if min_score is not None else []


async def matches(_root: Any, info: GraphQLResolveInfo, resume_id: Any, first: int | None = None,
                  after: Any = None, min_score: float | None = None, order: str | None = None) -> list[Row]:
    filters = [Filter("resume_id", "eq", parse_id(resume_id, "resume_id")), *_match_filters(min_score)]
    return await _rows(info, "matches", _page(info, first, after, _order(order)), filters)


async def predictions(_root: Any, info: GraphQLResolveInfo, resume_id: Any, first: int | None = None,
                      after: Any = None) -> list[Row]:
    filters = [Filter("resume_id", "eq", parse_id(resume_id, "resume_id"))]
    return await _rows(info, "predictions", _page(info, first, after), filters)


# ----------------------------------------------------------------------------- relations
_MISSING = object()


def parent(table: str, fk: str) -> Callable[..., Any]:
    """Resolver of a to-one relation: the ``table`` row whose id is the source's ``fk``.

    Answers synchronously when the row is loaded already (see ``children``), else with the
    loader's future (batched with the other rows' loads)."""

    def resolve(source: Row, info: GraphQLResolveInfo) -> Row | None | Future[Row | None]:
        data = _ctx(info).data
        row = data.loaded.get(table, {}).get(source[fk], _MISSING)
        return data.get(table, source[fk]) if row is _MISSING else row  # type: ignore[return-value]

    resolve.relation = (table, fk)  # type: ignore[attr-defined]
    return resolve


def _parents_selected(info: GraphQLResolveInfo) -> list[tuple[str, str]]:
    """The to-one relations (``parent`` resolvers) selected directly on the items of this list field."""
    item_type = get_named_type(info.return_type)
    if not isinstance(item_type, GraphQLObjectType):
        return []
    wanted = []
    for node in info.field_nodes:
        for selection in node.selection_set.selections if node.selection_set else ():
            if isinstance(selection, FieldNode):
                field = item_type.fields.get(selection.name.value)
                relation = getattr(field.resolve, "relation", None) if field is not None else None
                if relation is not None and relation not in wanted:
                    wanted.append(relation)
    return wanted


def children(table: str, fk: str, *, scored: bool = False) -> Callable[..., Any]:
    """Resolver of a to-many relation: a page of the ``table`` rows whose ``fk`` is the source's id.

    When the query selects to-one relations of those rows (a match's ``job``), they are loaded as
    soon as the page arrives, still one batch for all parents, so that each row's relation then
    resolves synchronously: graphql-core completes a row with no pending field much faster than
    one with a future."""

    def resolve(source: Row, info: GraphQLResolveInfo, first: int | None = None, after: Any = None,
                min_score: float | None = None, order: str | None = None) -> Awaitable[list[Row]]:
        filters = _match_filters(min_score) if scored else []
        page = _page(info, first, after, _order(order))
        data = _ctx(info).data
        rows = data.children(table, fk, source["id"], page, filters)
        wanted = _parents_selected(info)
        return _with_parents(data, rows, wanted) if wanted else rows

    return resolve


async def _with_parents(data: RequestData, pending: Awaitable[list[Row]] | list[Row],
                        wanted: list[tuple[str, str]]) -> list[Row]:
    rows = pending if isinstance(pending, list) else await pending
    # One load per distinct id not loaded yet (the loaders batch them with the other lists' loads);
    # they all resolve with the same batch, so awaiting them in turn costs no more than a gather.
    futures = [f for table, fk in wanted for f in data.get_missing(table, (row[fk] for row in rows))]
    try:
        for future in futures:
            await future
    except BaseException:
        for future in futures:  # retrieved, as gather would: no "exception was never retrieved" noise
            if future.done() and not future.cancelled():
                future.exception()
        raise
    return rows


# ----------------------------------------------------------------------------- Subscription
def _feed(info: GraphQLResolveInfo) -> Any:
    feed = _ctx(info).feed
    if feed is None:
        raise GraphQLError("subscriptions need the change feed of the webhook emitter, which is not running",
                           extensions={"code": "NO_CHANGE_FEED"})
    return feed


class FeedEvents:
    """The source stream of one subscription: the feed's events that ``keep`` accepts.

    Subscribes to the feed when built (so a row committed after ``subscribe`` returns is seen) and
    unsubscribes in ``aclose``, which graphql-core calls when the subscription ends. Each event
    gets fresh loaders (``OperationContext.renew``)."""

    def __init__(self, info: GraphQLResolveInfo, patterns: list[str], keep: Callable[[Any], bool]) -> None:
        self.context = _ctx(info)
        self.subscription = _feed(info).subscribe(patterns)
        self.keep = keep

    def __aiter__(self) -> FeedEvents:
        return self

    async def __anext__(self) -> Any:
        while True:
            event = await self.subscription.__anext__()
            if self.keep(event):
                self.context.renew()
                return event

    async def aclose(self) -> None:
        self.subscription.close()


def match_created(_root: Any, info: GraphQLResolveInfo, resume_id: Any = None) -> FeedEvents:
    wanted = None if resume_id is None else parse_id(resume_id, "resume_id")
    return FeedEvents(info, ["matches.insert"],
                      lambda e: e.new is not None and (wanted is None or e.new.get("resume_id") == wanted))


def row_changed(_root: Any, info: GraphQLResolveInfo, table: str) -> FeedEvents:
    if table not in COLUMNS:
        raise GraphQLError(f"table must be one of {', '.join(COLUMNS)}, got {table[:40]!r}")
    return FeedEvents(info, [f"{table}.*"], lambda e: e.table == table)


def event_row(event: Any, _info: GraphQLResolveInfo, **_args: Any) -> Any:
    """matchCreated's value: the inserted row (the event's ``new``)."""
    return event.new


def event_itself(event: Any, _info: GraphQLResolveInfo, **_args: Any) -> Any:
    """rowChanged's value: the event (a RowChange)."""
    return event
