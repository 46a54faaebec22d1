"""``RowExecutionContext`` answers exactly what graphql-core's own executor answers: the same data,
the same errors at the same paths, the same null propagation, on a small schema of ``dict`` rows
(including the cases its shortcuts hand back to the general path)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from graphql import (
    ExecutionContext,
    GraphQLArgument,
    GraphQLField,
    GraphQLFloat,
    GraphQLID,
    GraphQLInt,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    GraphQLString,
    execute,
    parse,
)

from graphql_gateway.executor import RowExecutionContext

JOBS = {1: {"id": 1, "title": "Welder", "salary": 10}, 2: {"id": 2, "title": {"not": "a string"}, "salary": None},
        3: {"id": 3, "title": None, "salary": 3}}
MATCHES = [{"id": 10, "job_id": 1, "score": 0.5}, {"id": 11, "job_id": 2, "score": 0.25},
           {"id": 12, "job_id": 3, "score": 0.75}, {"id": 13, "job_id": 99, "score": 0.1},
           {"id": 14, "job_id": 1, "score": float("nan")}]


def _job(source: dict[str, Any], info: Any) -> Any:
    return info.context.data.loaded["jobs"].get(source["job_id"])


_job.relation = ("jobs", "job_id")  # type: ignore[attr-defined]  # as resolvers.parent marks its resolvers


async def _async_job(source: dict[str, Any], info: Any) -> Any:
    await asyncio.sleep(0)
    return JOBS.get(source["job_id"])


def _schema() -> GraphQLSchema:
    job = GraphQLObjectType("Job", {
        "id": GraphQLField(GraphQLNonNull(GraphQLID)),
        "title": GraphQLField(GraphQLNonNull(GraphQLString)),
        "title_or_null": GraphQLField(GraphQLString, resolve=lambda s, _i: s["title"]),
        "salary": GraphQLField(GraphQLInt),
        "shout": GraphQLField(GraphQLString, args={"times": GraphQLArgument(GraphQLInt)},
                              resolve=lambda s, _i, times=1: str(s["title"]) * times),
    })
    match = GraphQLObjectType("Match", lambda: {
        "id": GraphQLField(GraphQLNonNull(GraphQLID)),
        "score": GraphQLField(GraphQLNonNull(GraphQLFloat)),
        "maybe_score": GraphQLField(GraphQLFloat, resolve=lambda s, _i: s["score"]),
        "job": GraphQLField(GraphQLNonNull(job), resolve=_job),
        "nullable_job": GraphQLField(job, resolve=_job),
        "later_job": GraphQLField(job, resolve=_async_job),
        "callable": GraphQLField(GraphQLString),
    })

    async def all_matches(_root: Any, _info: Any) -> list[dict[str, Any]]:
        return [dict(m) for m in MATCHES] + [{"id": 15, "job_id": 1, "score": 1.0, "callable": lambda _i: "called"}]

    query = GraphQLObjectType("Query", {
        "matches": GraphQLField(GraphQLNonNull(GraphQLList(GraphQLNonNull(match))), resolve=all_matches),
        "nullable_matches": GraphQLField(GraphQLList(match), resolve=all_matches),
    })
    return GraphQLSchema(query=query)


SCHEMA = _schema()

QUERIES = [
    "{ nullable_matches { id maybe_score nullable_job { id salary title_or_null } } }",
    "{ matches { id a: id job { id } } }",  # a non-null job of 99 is missing: the whole list nulls
    "{ nullable_matches { id job { id title } } }",  # non-null title null / not a string: the item nulls
    "{ nullable_matches { id nullable_job { id title } } }",  # ... the nullable relation nulls
    "{ nullable_matches { __typename id later_job { __typename id salary shout(times: 2) } callable } }",
    "{ nullable_matches { id score } }",  # NaN is not a Float
    """query { nullable_matches { ...M } }
       fragment M on Match { id ... on Match { nullable_job { id salary } } nullable_job { salary title_or_null } }""",
    "query($s: Boolean!) { nullable_matches { id @skip(if: $s) maybe_score @include(if: $s) } }",
]


def _run(cls: type[ExecutionContext], query: str) -> tuple[Any, list[Any]]:
    context = SimpleNamespace(data=SimpleNamespace(loaded={"jobs": {k: v for k, v in JOBS.items() if k != 3}}))

    async def go() -> Any:
        result = execute(SCHEMA, parse(query), context_value=context, variable_values={"s": True},
                         execution_context_class=cls)
        return await result if asyncio.iscoroutine(result) else result

    result = asyncio.run(go())
    return result.data, [e.formatted for e in result.errors or ()]


@pytest.mark.parametrize("query", QUERIES)
def test_the_row_executor_answers_what_graphql_core_answers(query: str) -> None:
    expected = _run(ExecutionContext, query)
    assert expected[0] is not None or expected[1], "the case proves nothing"
    assert _run(RowExecutionContext, query) == expected
