"""``RowExecutionContext``: graphql-core's executor with shortcuts for the gateway's rows.

The gateway's values are plain ``dict`` rows (``data.Row``) whose scalar fields have no resolver.
graphql-core's general path costs, per field of every row, a ``GraphQLResolveInfo``, the argument
coercion, the default resolver and three levels of ``complete_value``: ~5 µs a field, i.e. most of
a nested query's CPU (20 resumes × 10 matches × their jobs is ~1,100 fields). This subclass takes
three shortcuts, each only where it gives exactly what the general path would give, and hands
everything else (and every error) to the general path:

- a **scalar field without resolver or arguments** of a ``dict`` row: the row's value, serialized
  by the field's type; a null, a serializer's error or a callable value goes the general way,
  which raises or records the same error it always did;
- an **object value that is a ``dict``** (a row) of an object type without ``is_type_of``: its
  fields are executed directly (what ``complete_value`` → ``complete_object_value`` does after
  finding that the value is neither null, a list, a leaf nor abstract);
- a **to-one relation already loaded** (``resolvers.parent``, marked with ``relation``): the row
  from ``RequestData.loaded``, as its resolver would return it, without building its resolve info.

Plans are cached per execution by (parent type, id of the field node), like graphql-core's own
sub-field cache.
"""
from __future__ import annotations

from asyncio import gather
from collections.abc import Callable
from typing import Any

from graphql import (
    ExecutionContext,
    FieldNode,
    GraphQLEnumType,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLResolveInfo,
    GraphQLScalarType,
    Undefined,
    located_error,
)
from graphql.execution.execute import default_field_resolver, get_field_def
from graphql.pyutils import Path

__all__ = ["RowExecutionContext"]

_UNPLANNED: Any = object()
_MISSING: Any = object()


class _Leaf:
    """A scalar field without resolver or arguments: ``serialize(row[name])``."""

    __slots__ = ("name", "nullable", "serialize")

    def __init__(self, name: str, serialize: Callable[[Any], Any], nullable: bool) -> None:
        self.name = name
        self.serialize = serialize
        self.nullable = nullable


class _Parent:
    """A to-one relation (``resolvers.parent``): the ``table`` row whose id is the row's ``fk``."""

    __slots__ = ("fk", "table")

    def __init__(self, table: str, fk: str) -> None:
        self.table = table
        self.fk = fk


class RowExecutionContext(ExecutionContext):
    """An ``ExecutionContext`` that completes ``dict`` rows without the per-field general path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plans: dict[tuple[GraphQLObjectType, int], _Leaf | _Parent | None] = {}
        self._general = self.middleware_manager is not None or self.field_resolver is not default_field_resolver

    def _plan(self, parent_type: GraphQLObjectType, node: FieldNode) -> _Leaf | _Parent | None:
        if self._general or node.arguments:
            return None
        field_def = get_field_def(self.schema, parent_type, node)
        if field_def is None or field_def.args:
            return None
        return_type = field_def.type
        nullable = not isinstance(return_type, GraphQLNonNull)
        named = return_type.of_type if isinstance(return_type, GraphQLNonNull) else return_type
        if field_def.resolve is None:
            if isinstance(named, (GraphQLScalarType, GraphQLEnumType)):
                return _Leaf(node.name.value, named.serialize, nullable)
            return None
        relation = getattr(field_def.resolve, "relation", None)
        loaded = getattr(getattr(self.context_value, "data", None), "loaded", None)  # an OperationContext's
        if relation is not None and isinstance(loaded, dict) and isinstance(named, GraphQLObjectType) \
                and named.is_type_of is None:
            return _Parent(*relation)
        return None

    def execute_fields(self, parent_type: GraphQLObjectType, source_value: Any, path: Path | None,
                       fields: dict[str, list[FieldNode]]) -> Any:
        if type(source_value) is not dict:
            return super().execute_fields(parent_type, source_value, path, fields)
        plans = self._plans
        results: dict[str, Any] = {}
        awaitable_fields: list[str] = []
        is_awaitable = self.is_awaitable
        for response_name, field_nodes in fields.items():
            key = (parent_type, id(field_nodes[0]))
            plan = plans.get(key, _UNPLANNED)
            if plan is _UNPLANNED:
                plan = plans[key] = self._plan(parent_type, field_nodes[0])
            if type(plan) is _Leaf:
                value = source_value.get(plan.name)
                if value is None:
                    if plan.nullable:
                        results[response_name] = None
                        continue
                elif not callable(value):
                    try:
                        serialized = plan.serialize(value)
                    except Exception:  # noqa: BLE001 - the general path below reports it
                        serialized = None
                    if serialized is not None and serialized is not Undefined:
                        results[response_name] = serialized
                        continue
            elif type(plan) is _Parent:  # a to-one relation whose row is loaded already
                loaded = self.context_value.data.loaded.get(plan.table)
                fk_value = source_value.get(plan.fk)
                row = loaded.get(fk_value, _MISSING) if loaded is not None and fk_value is not None else _MISSING
                if type(row) is dict:
                    completed = self._complete_row(parent_type, field_nodes,
                                                   Path(path, response_name, parent_type.name), row)
                    results[response_name] = completed
                    if is_awaitable(completed):
                        awaitable_fields.append(response_name)
                    continue
            result = self.execute_field(parent_type, source_value, field_nodes,
                                        Path(path, response_name, parent_type.name))
            if result is not Undefined:
                results[response_name] = result
                if is_awaitable(result):
                    awaitable_fields.append(response_name)
        if not awaitable_fields:
            return results
        return self._gather_fields(results, awaitable_fields)

    @staticmethod
    async def _gather_fields(results: dict[str, Any], awaitable_fields: list[str]) -> dict[str, Any]:
        """As ``ExecutionContext.execute_fields``' ``get_results``; one awaitable (a resume's
        ``matches``, say) is awaited as is rather than wrapped in a task by ``gather``."""
        if len(awaitable_fields) == 1:
            name = awaitable_fields[0]
            results[name] = await results[name]
        else:
            results.update(zip(awaitable_fields, await gather(*(results[f] for f in awaitable_fields))))
        return results

    def _complete_row(self, parent_type: GraphQLObjectType, field_nodes: list[FieldNode], path: Path,
                      row: dict[str, Any]) -> Any:
        """The value of a loaded to-one relation, completed as ``execute_field`` would (with its errors)."""
        field_def = get_field_def(self.schema, parent_type, field_nodes[0])
        assert field_def is not None
        try:
            completed = self.complete_value(field_def.type, field_nodes, _NO_INFO, path, row)
        except Exception as raw_error:  # noqa: BLE001 - as ExecutionContext.execute_field
            self._field_error(raw_error, field_nodes, path, field_def.type)
            return None
        if self.is_awaitable(completed):
            return self._await_completed(completed, field_nodes, path, field_def.type)
        return completed

    async def _await_completed(self, completed: Any, field_nodes: list[FieldNode], path: Path,
                               return_type: GraphQLOutputType) -> Any:
        try:
            return await completed
        except Exception as raw_error:  # noqa: BLE001 - as ExecutionContext.execute_field
            self._field_error(raw_error, field_nodes, path, return_type)
            return None

    def _field_error(self, raw_error: Exception, field_nodes: list[FieldNode], path: Path,
                     return_type: GraphQLOutputType) -> None:
        """What ``ExecutionContext.handle_field_error`` does (its signature differs between 3.2
        releases: it takes the located error in 3.2.8, the raw one and the nodes in later ones)."""
        error = located_error(raw_error, field_nodes, path.as_list())
        if isinstance(return_type, GraphQLNonNull):
            raise error
        self.errors.append(error)

    def complete_value(self, return_type: GraphQLOutputType, field_nodes: list[FieldNode],
                       info: GraphQLResolveInfo, path: Path, result: Any) -> Any:
        if type(result) is dict:
            object_type = return_type.of_type if isinstance(return_type, GraphQLNonNull) else return_type
            if type(object_type) is GraphQLObjectType and object_type.is_type_of is None:
                return self.execute_fields(object_type, result, path, self.collect_subfields(object_type, field_nodes))
        return super().complete_value(return_type, field_nodes, info, path, result)


_NO_INFO: Any = None
