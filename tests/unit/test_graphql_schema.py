"""The GraphQL gateway without a database: the printed schema against the checked-in one, the
descriptions, the limits rule's arithmetic, the document bounds and the metrics' bounded labels."""
from __future__ import annotations

from typing import Any

import pytest
from graphql import (
    GraphQLError,
    GraphQLObjectType,
    OperationType,
    get_introspection_query,
    parse,
    validate,
)

from config.settings import GraphQLSettings
from graphql_gateway.gateway import DocumentCache, Gateway, Prepared, Rejected
from graphql_gateway.limits import limits_rule
from graphql_gateway.metrics import MAX_OPERATION_NAMES, GatewayStats
from graphql_gateway.schema import SCHEMA_FILE, build_schema, printed


def test_printed_schema_is_the_checked_in_schema_graphql() -> None:
    assert printed() == SCHEMA_FILE.read_text(), (
        "graphql_gateway/schema.graphql is stale: python -m graphql_gateway.schema > graphql_gateway/schema.graphql")


def test_every_type_field_and_argument_has_a_description() -> None:
    schema = build_schema()
    missing = []
    for name, type_ in schema.type_map.items():
        if name.startswith("__") or name in ("String", "Int", "Float", "Boolean", "ID"):
            continue
        if not type_.description:
            missing.append(name)
        if isinstance(type_, GraphQLObjectType):
            for field_name, field in type_.fields.items():
                if not field.description:
                    missing.append(f"{name}.{field_name}")
                missing += [f"{name}.{field_name}({a})" for a, arg in field.args.items() if not arg.description]
    assert not missing


def test_the_seed_queries_exist_with_the_seed_argument_names() -> None:
    fields = build_schema().query_type.fields  # type: ignore[union-attr]
    assert {"user", "users", "resume", "resumes", "job", "jobs", "matches", "predictions"} <= fields.keys()
    assert "id" in fields["user"].args and "resume_id" in fields["matches"].args
    assert str(fields["users"].type) == "[User!]!"
    assert {"matchCreated", "rowChanged"} == build_schema().subscription_type.fields.keys()  # type: ignore[union-attr]


def _errors(query: str, variables: dict[str, Any] | None = None, **settings: Any) -> list[str]:
    rule = limits_rule(GraphQLSettings(**settings), variables)
    return [e.message for e in validate(build_schema(), parse(query), [rule])]


NESTED = "{ resumes(first: 100) { matches(first: 20) { job { id } } } }"  # 100 + 100*20 + 100*20 = 4100 rows


def test_cost_is_rows_from_page_sizes_multiplied_down_the_tree() -> None:
    assert _errors(NESTED, max_cost=4100) == []
    assert _errors(NESTED, max_cost=4099) == [
        "query cost 4100 (estimated rows) exceeds the maximum cost (graphql.max_cost=4099)"]
    # the default page size applies where `first` is absent; variables and fragments count the same
    assert _errors("{ resumes { matches { id } } }", max_cost=1, default_page_size=3) == [
        "query cost 12 (estimated rows) exceeds the maximum cost (graphql.max_cost=1)"]
    assert _errors("query($n: Int = 7) { ...R } fragment R on Query { resumes(first: $n) { id } }",
                   {"n": 9}, max_cost=8) == ["query cost 9 (estimated rows) exceeds the maximum cost (graphql.max_cost=8)"]


def test_depth_counts_nested_fields_and_ignores_introspection() -> None:
    assert _errors("{ resume(id: 1) { user { resumes { id } } } }", max_depth=4) == []
    assert _errors("{ resume(id: 1) { user { resumes { id } } } }", max_depth=3) == [
        "query depth 4 exceeds the maximum depth (graphql.max_depth=3)"]
    assert _errors("{ __schema { types { fields { type { ofType { ofType { name } } } } } } }", max_depth=1) == []


@pytest.mark.parametrize("first", [-1, 501])
def test_page_size_outside_the_range_is_an_error(first: int) -> None:
    assert _errors(f"{{ users(first: {first}) {{ id }} }}") == [
        f"first={first} on users is outside 0..500 (graphql.max_page_size=500)"]


def test_mutations_are_refused_as_read_only() -> None:
    assert _errors("mutation { x }") == ["mutations are not supported: the GraphQL gateway is read-only"]


def test_operation_labels_are_bounded() -> None:
    stats = GatewayStats()
    for i in range(MAX_OPERATION_NAMES + 10):
        stats.operation_finished(f"Op{i}", "ok", 0.01, 2)
    stats.operation_finished(None, "ok", 0.01, 1)
    stats.operation_finished("x" * 500, "rejected", 0.01, None)
    labels = {operation for operation, _ in stats.operations}
    assert len(labels) == MAX_OPERATION_NAMES + 2  # the first names, "other" and "anonymous"
    assert stats.operations[("other", "ok")] == 10 and stats.operations[("other", "rejected")] == 1
    assert stats.operations[("anonymous", "ok")] == 1


def test_documents_are_parsed_and_validated_once_per_text_and_bounded() -> None:
    cache = DocumentCache(build_schema(), max_depth=8)
    first = cache.get("{ users { id } }")
    assert first is cache.get("{ users { id } }") and not isinstance(first, GraphQLError) and first[1] == []
    assert isinstance(cache.get("{ users {"), GraphQLError)
    assert [e.message for e in cache.get("{ users { nope } }")[1]] == [  # type: ignore[index]
        "Cannot query field 'nope' on type 'User'."]
    for i in range(DocumentCache.MAX_ENTRIES + 5):
        cache.get(f"query Q{i} {{ users {{ id }} }}")
    assert len(cache._entries) == DocumentCache.MAX_ENTRIES  # the bound is the point
    assert cache.get("{ users { id } }") is not first  # evicted (least recently used), parsed again


def test_a_document_too_deep_or_too_long_to_parse_is_a_syntax_error() -> None:
    cache = DocumentCache(build_schema(), max_depth=8)
    deep = cache.get("{ users " + "{ resumes " * 3000 + "{ id }" + " }" * 3001)
    assert isinstance(deep, GraphQLError) and deep.message == (
        "Syntax Error: the document is nested too deeply to parse (graphql.max_depth=8 applies anyway)")
    long = cache.get("{ " + "users { id } " * 2_000 + "}")
    assert isinstance(long, GraphQLError) and "more than 5000 tokens" in long.message
    # What clients really send stays well inside: GraphiQL's full introspection query.
    introspection = get_introspection_query(descriptions=True, specified_by_url=True, directive_is_repeatable=True,
                                            schema_description=True, input_value_deprecation=True)
    assert not isinstance(cache.get(introspection), GraphQLError)


def test_a_fragment_spread_many_times_is_measured_once_per_fragment() -> None:
    # 30 fragments, each spreading the next twice: 2**29 spreads of the last. Walking every spread
    # would take minutes on the proxy's event loop; its cost is still counted in full.
    chain = " ".join(f"fragment F{i} on Query {{ ...F{i + 1} ...F{i + 1} }}" for i in range(29))
    query = f"query {{ ...F0 }} {chain} fragment F29 on Query {{ resumes(first: 1) {{ id user {{ id }} }} }}"
    assert _errors(query, max_depth=1) == [
        "query depth 3 exceeds the maximum depth (graphql.max_depth=1)",
        f"query cost {2 * 2**29} (estimated rows) exceeds the maximum cost (graphql.max_cost=50000)"]
    # depth through nested fragments adds up as if they were written inline
    assert _errors("query { ...A } fragment A on Query { resumes { ...B } } fragment B on Resume { user { id } }",
                   max_depth=2) == ["query depth 3 exceeds the maximum depth (graphql.max_depth=2)"]


def test_limits_see_an_int_variable_sent_as_a_whole_float() -> None:
    # JSON has no integers: 500.0 is a valid Int for graphql-core's coercion, so the cost must count it
    gateway = Gateway(GraphQLSettings(), None, 5.0)  # type: ignore[arg-type]  # no pool: nothing executes
    query = "query($n: Int, $m: Int) { resumes(first: $n) { matches(first: $m) { job { id } } } }"
    prepared = gateway.prepare(query, {"n": 500.0, "m": 500.0}, None, (OperationType.QUERY,))
    assert isinstance(prepared, Rejected)
    assert [e.message for e in prepared.errors] == [
        "query cost 500500 (estimated rows) exceeds the maximum cost (graphql.max_cost=50000)"]
    assert isinstance(gateway.prepare(query, {"n": 10.0, "m": 5}, None, (OperationType.QUERY,)), Prepared)


def test_a_document_whose_fragments_expand_too_far_is_refused_before_validation() -> None:
    # graphql-core's MaxIntrospectionDepthRule walks every spread: 2**29 walks for this document
    chain = " ".join(f"fragment F{i} on __Schema {{ ...F{i + 1} ...F{i + 1} }}" for i in range(29))
    cache = DocumentCache(build_schema(), max_depth=8)
    entry = cache.get(f"query {{ __schema {{ ...F0 }} }} {chain} fragment F29 on __Schema {{ description }}")
    assert not isinstance(entry, GraphQLError)
    assert [(e.message, e.extensions) for e in entry[1]] == [
        (f"the document expands to {1 + 2**29} selections through its fragments, more than 10000",
         {"code": "TOO_COMPLEX"})]
    # GraphiQL's own introspection query is far below the bound
    introspection = cache.get(get_introspection_query(descriptions=True))
    assert not isinstance(introspection, GraphQLError) and introspection[1] == []


ALIKE: dict[str, Any] = {
    "fields": lambda n: "{ " + " ".join("users { id }" for _ in range(n)) + " }",
    "inline-fragments": lambda n: "{ " + " ".join("... on Query { users { id } }" for _ in range(n)) + " }",
    "fragments": lambda n: "{ " + " ".join(f"...F{i}" for i in range(n)) + " } " + " ".join(
        f"fragment F{i} on Query {{ users {{ id }} }}" for i in range(n)),
    "aliases-nested": lambda n: "{ users { " + " ".join("x: id" for _ in range(n)) + " } }",
}


@pytest.mark.parametrize("kind", ALIKE)
def test_a_selection_with_too_many_fields_named_alike_is_refused_before_validation(kind: str) -> None:
    # graphql-core's OverlappingFieldsCanBeMerged compares them pairwise: 1,000 took 3 s
    entry = DocumentCache(build_schema(), max_depth=8).get(ALIKE[kind](26))
    assert not isinstance(entry, GraphQLError)
    assert [(e.message, e.extensions) for e in entry[1]] == [
        ("a selection has 26 fields named alike (with its fragments), more than 25", {"code": "TOO_COMPLEX"})]
    # 25 are fine (several fragments that all select id are common)
    assert DocumentCache(build_schema(), max_depth=8).get(ALIKE[kind](25))[1] == []  # type: ignore[index]


def test_introspection_fields_are_limited_per_operation_aliases_and_fragments_included() -> None:
    schema = "__schema { types { name } }"
    assert _errors("{ " + " ".join(f"a{i}: {schema}" for i in range(3)) + " }") == []
    assert _errors("{ " + " ".join(f"a{i}: {schema}" for i in range(4)) + " }") == [
        "the operation selects 4 introspection fields (__schema, __type), more than 3"]
    assert _errors(f"{{ ...F ...G }} fragment F on Query {{ a: {schema} b: __type(name: \"User\") {{ name }} }} "
                   f"fragment G on Query {{ ...F }}") == [
        "the operation selects 4 introspection fields (__schema, __type), more than 3"]
    assert _errors("{ users { __typename id } }") == []  # __typename is not introspection of the schema
