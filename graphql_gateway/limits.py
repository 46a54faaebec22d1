"""The gateway's limits that are checked before any SQL runs: one validation rule, built per request
(``limits_rule(settings, variables)``) and run with graphql-core's ``validate`` beside the
specified rules.

For each operation it walks the selection tree (through fragments, skipping introspection) and
reports, each as a GraphQL error naming the setting:

- ``max_depth``: the longest chain of nested fields (a top-level scalar is depth 1);
- ``max_page_size``: a ``first`` above it (literal, variable or default) or below 0;
- ``max_cost``: estimated rows: each object field costs the rows its parent may have times its
  page size (``first``, else ``graphql.default_page_size``) for a list, times 1 otherwise; the
  operation's cost is the sum. ``resumes(first: 100) { matches(first: 20) { job { id } } }``
  costs 100 + 100*20 + 100*20 = 4100;
- read-only: a mutation is refused (the schema has none; the error says why);
- introspection: at most ``MAX_INTROSPECTION_FIELDS`` ``__schema``/``__type`` fields per operation
  (aliases and fragment spreads count): they run no SQL but cost CPU on the proxy's event loop.

The query timeout (``query_timeout_s``) is enforced around execution, in ``graphql_gateway.app``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    TypeInfo,
    ValidationContext,
    ValidationRule,
    VariableNode,
    get_named_type,
    get_nullable_type,
    is_list_type,
)

from config.settings import GraphQLSettings

__all__ = ["MAX_INTROSPECTION_FIELDS", "Measure", "check_limits", "limits_rule"]


#: Introspection fields (``__schema``, ``__type``) an operation may select, aliases and fragment
#: spreads included. Introspection runs no SQL, but each costs the event loop ~3-8 ms (GraphiQL's
#: full query: 8 ms), and aliases repeat it: 1,300 aliased ``__schema`` fit in the token limit.
MAX_INTROSPECTION_FIELDS = 3
INTROSPECTION_FIELDS = ("__schema", "__type")


@dataclass(slots=True)
class Measure:
    depth: int = 0
    cost: int = 0
    introspection: int = 0


def limits_rule(settings: GraphQLSettings, variables: Mapping[str, Any] | None) -> type[ValidationRule]:
    """A validation rule class enforcing ``settings``' limits, knowing this request's variables."""
    values = dict(variables or {})

    class LimitsRule(ValidationRule):
        _memo: dict[str, Measure | None]

        def enter_operation_definition(self, node: OperationDefinitionNode, *_args: Any) -> Any:
            context: ValidationContext = self.context
            if node.operation == OperationType.MUTATION:
                self.report_error(GraphQLError(
                    "mutations are not supported: the GraphQL gateway is read-only", node,
                    extensions={"code": "READ_ONLY"}))
                return self.SKIP
            root = context.schema.get_root_type(node.operation)
            if root is None:
                return self.SKIP
            defaults = {d.variable.name.value: d.default_value for d in node.variable_definitions or ()}
            measure = Measure()
            self._memo = {}
            self._walk(node.selection_set, root, 1, 1, measure, defaults)
            if measure.depth > settings.max_depth:
                self.report_error(GraphQLError(
                    f"query depth {measure.depth} exceeds the maximum depth (graphql.max_depth={settings.max_depth})",
                    node, extensions={"code": "DEPTH_LIMIT", "limit": "max_depth", "value": measure.depth}))
            if measure.introspection > MAX_INTROSPECTION_FIELDS:
                self.report_error(GraphQLError(
                    f"the operation selects {measure.introspection} introspection fields (__schema, __type), "
                    f"more than {MAX_INTROSPECTION_FIELDS}", node,
                    extensions={"code": "INTROSPECTION_LIMIT", "value": measure.introspection}))
            if measure.cost > settings.max_cost:
                self.report_error(GraphQLError(
                    f"query cost {measure.cost} (estimated rows) exceeds the maximum cost "
                    f"(graphql.max_cost={settings.max_cost})",
                    node, extensions={"code": "COST_LIMIT", "limit": "max_cost", "value": measure.cost}))
            return self.SKIP

        def _page_size(self, field: FieldNode, defaults: Mapping[str, Any]) -> int:
            for arg in field.arguments or ():
                if arg.name.value != "first":
                    continue
                value: Any = arg.value
                if isinstance(value, VariableNode):
                    name = value.name.value
                    if name in values:
                        value = values[name]
                    else:
                        value = defaults.get(name)
                if isinstance(value, IntValueNode):
                    value = int(value.value)
                if isinstance(value, float) and value.is_integer():
                    value = int(value)  # Int coercion accepts 500.0 as 500: so must the limits
                if isinstance(value, int) and not isinstance(value, bool):
                    if value > settings.max_page_size or value < 0:
                        self.report_error(GraphQLError(
                            f"first={value} on {field.name.value} is outside 0..{settings.max_page_size} "
                            f"(graphql.max_page_size={settings.max_page_size})", field,
                            extensions={"code": "PAGE_SIZE_LIMIT", "limit": "max_page_size", "value": value}))
                        return settings.max_page_size
                    return value
            return settings.default_page_size

        def _walk(self, selections: SelectionSetNode, parent: GraphQLNamedType, depth: int, rows: int,
                  measure: Measure, defaults: Mapping[str, Any]) -> None:
            context: ValidationContext = self.context
            for selection in selections.selections:
                if isinstance(selection, FieldNode):
                    name = selection.name.value
                    if name in INTROSPECTION_FIELDS:
                        measure.introspection += rows
                    if name.startswith("__") or not isinstance(parent, GraphQLObjectType):
                        continue  # introspection costs no SQL; unknown types are other rules' business
                    measure.depth = max(measure.depth, depth)
                    definition = parent.fields.get(name)
                    if definition is None or selection.selection_set is None:
                        continue
                    many = is_list_type(get_nullable_type(definition.type))  # type: ignore[arg-type]
                    here = rows * (self._page_size(selection, defaults) if many else 1)
                    measure.cost += here
                    self._walk(selection.selection_set, get_named_type(definition.type), depth + 1, here,
                               measure, defaults)
                elif isinstance(selection, InlineFragmentNode):
                    condition = selection.type_condition
                    target = context.schema.get_type(condition.name.value) if condition else parent
                    if target is not None:
                        self._walk(selection.selection_set, target, depth, rows, measure, defaults)
                elif isinstance(selection, FragmentSpreadNode):
                    inner = self._fragment(selection.name.value, defaults)
                    if inner is not None:
                        if inner.depth:
                            measure.depth = max(measure.depth, depth + inner.depth - 1)
                        measure.cost += rows * inner.cost
                        measure.introspection += rows * inner.introspection

        def _fragment(self, name: str, defaults: Mapping[str, Any]) -> Measure | None:
            """A fragment's depth and cost for one row at depth 1, measured once per operation.

            Its cost is linear in the rows it applies to, so a fragment spread N times is walked once:
            walking every spread is exponential in a chain of fragments that each spread the next
            twice (20 such fragments are a million walks on the proxy's event loop)."""
            memo: dict[str, Measure | None] = self._memo
            if name in memo:
                return memo[name]  # None while it is being measured: a cycle (NoFragmentCycles reports it)
            context: ValidationContext = self.context
            fragment = context.get_fragment(name)
            if fragment is None:
                return None  # unknown: KnownFragmentNames reports it
            target = context.schema.get_type(fragment.type_condition.name.value)
            memo[name] = None
            measure = Measure()
            if target is not None:
                self._walk(fragment.selection_set, target, 1, 1, measure, defaults)
            memo[name] = measure
            return measure

    return LimitsRule


def check_limits(schema: GraphQLSchema, document: DocumentNode, settings: GraphQLSettings,
                 variables: Mapping[str, Any] | None) -> list[GraphQLError]:
    """The errors ``limits_rule`` reports for ``document``, without a full ``validate`` pass.

    The rule looks at operation definitions only (it walks their selections itself), so its
    handler is called for each of them directly: ``validate`` would visit every node of the
    document with a ``TypeInfo`` on every request for nothing."""
    errors: list[GraphQLError] = []
    context = ValidationContext(schema, document, TypeInfo(schema), errors.append)
    rule: Any = limits_rule(settings, variables)(context)
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            rule.enter_operation_definition(definition)
    return errors
