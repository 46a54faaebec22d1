"""The GraphQL gateway (issue 8) on a real PostgreSQL with the migrated recruiter schema and demo data,
behind a real proxy and agent: the seed's queries against what SQL says, batching counted by the
proxy's own statistics, the limits, GraphQL over HTTP for good and bad requests, the metrics, and a
subscription that sees a row inserted by another connection."""
from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import psycopg
import pytest

from agent import keys
from graphql_gateway.app import APPLICATION_NAME
from migrations import runner
from migrations.demo import seed_demo
from tests.helpers.agent_http import RunningAgent, parse_samples, sample_value
from tests.helpers.proxy_thread import RunningProxy
from tests.helpers.wire import wait_for

DEMO_USERS = 200  # 300 resumes, 20 jobs, 6000 matches (20 per resume), 600 predictions


@pytest.fixture(scope="module")
def recruiter_dsn(pg_server: Any) -> Iterator[str]:
    """A database migrated to head (``pgsidecar migrate``) and filled by ``pgsidecar seed-demo``."""
    name = f"pgsidecar_gql_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(**pg_server.psycopg_kwargs(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = pg_server.dsn_for(database=name)
    try:
        runner.upgrade(runner.alembic_config(dsn))
        seed_demo(dsn, DEMO_USERS)
        yield dsn
    finally:
        with psycopg.connect(**pg_server.psycopg_kwargs(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def db(recruiter_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A direct connection (not through the proxy): the witness of what SQL says."""
    with psycopg.connect(recruiter_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def sidecar(recruiter_dsn: str) -> Iterator[RunningAgent]:
    """A proxy (default settings) and its agent with the gateway at /graphql."""
    proxy = RunningProxy(recruiter_dsn)
    agent = RunningAgent(proxy)
    yield agent
    agent.stop()
    proxy.stop()


def post(agent: RunningAgent, query: str, variables: Any = None, *, accept: str | None = None,
         operation_name: str | None = None) -> tuple[int, str, Any]:
    """(status, content type, JSON body) of a POST /graphql."""
    doc: dict[str, Any] = {"query": query}
    if variables is not None:
        doc["variables"] = variables
    if operation_name is not None:
        doc["operationName"] = operation_name
    headers = {"Content-Type": "application/json"}
    if accept:
        headers["Accept"] = accept
    return raw(agent, "POST", "/graphql", json.dumps(doc).encode(), headers)


def raw(agent: RunningAgent, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    status, response_headers, data = agent.request(method, path, headers=headers, body=body)
    content_type = response_headers.get("Content-Type", "")
    return status, content_type, json.loads(data)


def data_of(agent: RunningAgent, query: str, variables: Any = None) -> Any:
    status, _, body = post(agent, query, variables)
    assert status == 200 and "errors" not in body, body
    return body["data"]


def gateway_statements(agent: RunningAgent) -> int:
    """Statements the proxy timed for the gateway's sessions (its own statistics)."""
    server = agent.proxy.server

    def calls() -> int:
        stats = server.query_stats()
        assert stats is not None
        return sum(fp.calls for fp in stats.top(limit=100_000) if APPLICATION_NAME in fp.application_names)

    return int(agent.proxy.run(calls))


def rows(db: psycopg.Connection[Any], sql: str, *params: Any) -> list[dict[str, Any]]:
    """SQL's answer, shaped like GraphQL's: ids as strings, timestamps as ISO text."""
    cur = db.execute(sql, params)
    names = [c.name for c in cur.description or ()]
    out = []
    for values in cur.fetchall():
        row = {}
        for name, value in zip(names, values):
            if name == "id" or name.endswith("_id"):
                value = str(value)
            elif hasattr(value, "isoformat"):
                value = value.isoformat()
            row[name] = value
        out.append(row)
    return out


# ----------------------------------------------------------------------------- the seed's queries
SEED_QUERIES = [
    ("user", "{ user(id: 7) { id email full_name location created_at } }",
     "SELECT id, email, full_name, location, created_at FROM users WHERE id = 7", True),
    ("users", "{ users(first: 25, after: 10) { id email full_name } }",
     "SELECT id, email, full_name FROM users WHERE id > 10 ORDER BY id LIMIT 25", False),
    ("resume", "{ resume(id: 12) { id user_id title summary skills experience_years } }",
     "SELECT id, user_id, title, summary, skills, experience_years FROM resumes WHERE id = 12", True),
    ("resumes", "{ resumes(first: 40, user_id: 8) { id user_id title } }",
     "SELECT id, user_id, title FROM resumes WHERE user_id = 8 ORDER BY id LIMIT 40", False),
    ("job", "{ job(id: 3) { id company_id title required_skills salary_min salary_max } }",
     "SELECT id, company_id, title, required_skills, salary_min, salary_max FROM jobs WHERE id = 3", True),
    ("jobs", "{ jobs(company_id: 2) { id company_id title } }",
     "SELECT id, company_id, title FROM jobs WHERE company_id = 2 ORDER BY id LIMIT 50", False),
    ("matches", "{ matches(resume_id: 5, min_score: 0.4) { id resume_id job_id match_score } }",
     ("SELECT id, resume_id, job_id, match_score FROM matches WHERE resume_id = 5 AND match_score >= 0.4 "
      "ORDER BY id LIMIT 50"), False),
    ("matches", "{ matches(resume_id: 9, first: 5, order: MATCH_SCORE_DESC) { id job_id match_score } }",
     "SELECT id, job_id, match_score FROM matches WHERE resume_id = 9 ORDER BY match_score DESC, id LIMIT 5", False),
    ("predictions", "{ predictions(resume_id: 10) { id resume_id job_id model_version predicted_score features } }",
     ("SELECT id, resume_id, job_id, model_version, predicted_score, features FROM predictions "
      "WHERE resume_id = 10 ORDER BY id LIMIT 50"), False),
]


@pytest.mark.parametrize(("field", "query", "sql", "single"), SEED_QUERIES,
                         ids=[f"{q[0]}-{i}" for i, q in enumerate(SEED_QUERIES)])
def test_each_seed_query_returns_what_sql_says(sidecar: RunningAgent, db: psycopg.Connection[Any], field: str,
                                               query: str, sql: str, single: bool) -> None:
    expected = rows(db, sql)
    assert expected, f"the demo data has no rows for {sql}: the comparison would prove nothing"
    got = data_of(sidecar, query)[field]
    assert got == (expected[0] if single else expected)


def test_unknown_id_is_null_and_a_bad_id_is_an_error(sidecar: RunningAgent) -> None:
    assert data_of(sidecar, "{ user(id: 999999) { id } }") == {"user": None}
    status, _, body = post(sidecar, '{ user(id: "seven") { id } }')
    assert status == 200 and body["data"] == {"user": None}
    assert body["errors"][0]["message"] == "id must be a numeric id, got 'seven'"
    status, _, body = post(sidecar, '{ resumes(user_id: "9223372036854775808") { id } }')  # bigint max + 1
    assert status == 200 and body["errors"][0]["message"] == "user_id must be a numeric id, got '9223372036854775808'"
    for not_ascii in ("²", "١٢"):  # str.isdigit() says yes to both
        status, _, body = post(sidecar, "query($id: ID!) { job(id: $id) { id } }", {"id": not_ascii})
        assert status == 200 and body["data"] == {"job": None}
        assert [(e["message"], e.get("extensions")) for e in body["errors"]] == [
            (f"id must be a numeric id, got {not_ascii!r}", None)]


def test_arguments_are_bound_never_interpolated(sidecar: RunningAgent, db: psycopg.Connection[Any]) -> None:
    email = "x' OR '1'='1"
    assert data_of(sidecar, "query($e: String) { users(email: $e) { id } }", {"e": email}) == {"users": []}
    assert data_of(sidecar, "{ users(email: \"user3@example.com\") { id } }") == {"users": [{"id": "3"}]}
    status, _, body = post(sidecar, '{ resumes(user_id: "1); DROP TABLE users; --") { id } }')
    assert status == 200 and body["errors"][0]["message"].startswith("user_id must be a numeric id")
    assert db.execute("SELECT count(*) FROM users").fetchone() == (DEMO_USERS,)


def test_relations_both_ways_match_sql(sidecar: RunningAgent, db: psycopg.Connection[Any]) -> None:
    got = data_of(sidecar, """{ resume(id: 4) { id user { id full_name resumes { id } }
        matches(first: 3, order: MATCH_SCORE_DESC) { match_score job { id company { name } } resume { id } }
        predictions { id job { id } } } }""")["resume"]
    user = rows(db, "SELECT u.id, u.full_name FROM users AS u JOIN resumes AS r ON r.user_id = u.id WHERE r.id = 4")[0]
    assert got["user"]["id"] == user["id"] and got["user"]["full_name"] == user["full_name"]
    assert got["user"]["resumes"] == rows(db, "SELECT id FROM resumes WHERE user_id = %s ORDER BY id", int(user["id"]))
    best = rows(db, """SELECT m.match_score, j.id AS job, c.name FROM matches AS m JOIN jobs AS j ON j.id = m.job_id
                       JOIN companies AS c ON c.id = j.company_id WHERE m.resume_id = 4
                       ORDER BY m.match_score DESC, m.id LIMIT 3""")
    assert [(m["match_score"], m["job"]["id"], m["job"]["company"]["name"]) for m in got["matches"]] == \
        [(b["match_score"], str(b["job"]), b["name"]) for b in best]
    assert {m["resume"]["id"] for m in got["matches"]} == {"4"}
    assert [(p["id"], p["job"]["id"]) for p in got["predictions"]] == \
        [(p["id"], p["job_id"]) for p in rows(db, "SELECT id, job_id FROM predictions WHERE resume_id = 4 ORDER BY id")]
    company = data_of(sidecar, "{ company(id: 2) { jobs(first: 3) { id company_id matches(first: 2) { job_id } } } }")
    jobs = company["company"]["jobs"]
    assert [j["id"] for j in jobs] == [r["id"] for r in rows(db, "SELECT id FROM jobs WHERE company_id = 2 ORDER BY id LIMIT 3")]
    for j in jobs:
        assert j["company_id"] == "2" and len(j["matches"]) == 2 and {m["job_id"] for m in j["matches"]} == {j["id"]}


def test_after_pages_through_a_relation_by_id(sidecar: RunningAgent, db: psycopg.Connection[Any]) -> None:
    all_ids = [r["id"] for r in rows(db, "SELECT id FROM matches WHERE resume_id = 3 ORDER BY id")]
    seen: list[str] = []
    after: str | None = None
    while True:
        page = data_of(sidecar, "query($after: ID) { resume(id: 3) { matches(first: 7, after: $after) { id } } }",
                       {"after": after})["resume"]["matches"]
        if not page:
            break
        seen += [m["id"] for m in page]
        after = page[-1]["id"]
    assert seen == all_ids and len(all_ids) == 20


# ----------------------------------------------------------------------------- batching
NESTED = """query Nested($first: Int) { resumes(first: $first) { id title user { id full_name }
            matches(first: 20) { id match_score job { id title } } } }"""


def test_100_resumes_with_user_matches_and_jobs_take_four_statements(sidecar: RunningAgent,
                                                                   db: psycopg.Connection[Any]) -> None:
    data_of(sidecar, NESTED, {"first": 3})  # sessions opened and statements prepared: not what is counted
    before = gateway_statements(sidecar)
    data = data_of(sidecar, NESTED, {"first": 100})
    statements = gateway_statements(sidecar) - before

    resumes = data["resumes"]
    assert len(resumes) == 100
    assert sum(len(r["matches"]) for r in resumes) == 2000
    pairs = {(r["id"], m["id"], m["job"]["id"]) for r in resumes for m in r["matches"]}
    assert pairs == {(x["resume_id"], x["id"], x["job_id"]) for x in rows(
        db, "SELECT resume_id, id, job_id FROM matches WHERE resume_id IN (SELECT id FROM resumes ORDER BY id LIMIT 100)")}
    # one statement per relation per level: resumes, their users, their matches, the matches' jobs
    assert statements == 4, f"{statements} statements for 100 resumes: batching is broken (N+1 would be ~2200)"
    # transaction pooling: the gateway's idle sessions hold no server connection (none is pinned)
    assert sidecar.proxy.snapshot().clients.pinned == 0
    scrape = parse_samples(sidecar.request("GET", "/metrics")[2].decode())
    assert sample_value(scrape, "pgsidecar_graphql_operation_sql_statements_bucket", operation="Nested", le="4.0") == \
        sample_value(scrape, "pgsidecar_graphql_operation_sql_statements_count", operation="Nested")


def test_gateway_reads_use_the_proxys_result_cache_and_see_writes(sidecar: RunningAgent,
                                                                  db: psycopg.Connection[Any]) -> None:
    front = sidecar.proxy.server.cache_front
    assert front is not None, "cache.mode is off by default?"

    def hits() -> int:
        return int(sidecar.proxy.run(lambda: front.snapshot().cache.hits))

    query = "{ resume(id: 21) { title user { full_name } } }"

    def repeat_is_served_from_the_cache() -> bool:
        data_of(sidecar, query)  # stored once the cache's LISTEN connection is up (it starts lazily)
        before = hits()
        data_of(sidecar, query)
        return hits() - before == 2  # the resume and its user

    wait_for("the gateway's repeated reads to be cache hits", repeat_is_served_from_the_cache)
    db.execute("UPDATE resumes SET title = 'Cache buster' WHERE id = 21")  # straight on the server: the trigger
    wait_for("the write to invalidate the cached resume", lambda: data_of(sidecar, query)["resume"]["title"]
             == "Cache buster")


def test_relations_behind_fragments_are_batched_too(sidecar: RunningAgent) -> None:
    # a relation selected through fragments is not loaded ahead with its list (the resolver sees
    # only direct fields) but through the loaders' futures: the same rows, the same statements
    direct = data_of(sidecar, "{ resumes(first: 30) { id user { id } matches(first: 5) { id job { id } } } }")
    before = gateway_statements(sidecar)
    through = data_of(sidecar, """query { resumes(first: 30) { ...R } }
        fragment R on Resume { id ... on Resume { user { id } } matches(first: 5) { id ...J } }
        fragment J on Match { job { id } }""")
    assert gateway_statements(sidecar) - before == 4
    assert through == direct


# ----------------------------------------------------------------------------- limits
@pytest.mark.parametrize(("query", "variables", "limit", "words"), [
    ("{ resumes { matches { resume { matches { resume { matches { resume { matches { id } } } } } } } } }", None,
     "max_depth", "query depth 9 exceeds the maximum depth (graphql.max_depth=8)"),
    ("{ resumes(first: 500) { matches(first: 500) { id } } }", None,
     "max_cost", "query cost 250500 (estimated rows) exceeds the maximum cost (graphql.max_cost=50000)"),
    ("{ users(first: 501) { id } }", None,
     "max_page_size", "first=501 on users is outside 0..500 (graphql.max_page_size=500)"),
    ("query($n: Int) { resume(id: 1) { matches(first: $n) { id } } }", {"n": 10_000},
     "max_page_size", "first=10000 on matches is outside 0..500 (graphql.max_page_size=500)"),
], ids=["depth", "cost", "page-size", "page-size-variable"])
def test_each_limit_is_an_error_naming_it_before_any_sql(sidecar: RunningAgent, query: str, variables: Any,
                                                         limit: str, words: str) -> None:
    before = gateway_statements(sidecar)
    status, content_type, body = post(sidecar, query, variables, accept="application/graphql-response+json")
    assert status == 400 and content_type.startswith("application/graphql-response+json")
    assert "data" not in body
    assert [e["message"] for e in body["errors"] if e["extensions"]["limit"] == limit] == [words]
    assert gateway_statements(sidecar) == before, "a query over a limit reached the database"


def test_cost_under_the_limit_runs(sidecar: RunningAgent) -> None:
    # 100 + 100*20 + 100*20 = 4100 estimated rows: under max_cost, so it runs
    assert len(data_of(sidecar, "{ resumes(first: 100) { matches(first: 20) { job { id } } } }")["resumes"]) == 100


def test_query_timeout_cancels_the_statement(proxy_factory: Any, recruiter_dsn: str, db: psycopg.Connection[Any],
                                             direct: Any) -> None:
    proxy = proxy_factory(upstream_dsn=recruiter_dsn, graphql__query_timeout_s=0.5)
    agent = RunningAgent(proxy)
    try:
        locker = psycopg.connect(recruiter_dsn)  # holds a lock the gateway's statement waits for
        try:
            locker.execute("LOCK TABLE companies IN ACCESS EXCLUSIVE MODE")
            status, _, body = post(agent, "{ companies { id } }")
            assert status == 200 and body["data"] is None
            [error] = body["errors"]
            assert error["extensions"] == {"code": "QUERY_TIMEOUT", "limit": "query_timeout_s"}
            assert "graphql.query_timeout_s=0.5" in error["message"]
            # the statement was cancelled on the server, not left waiting for the lock
            wait_for("the gateway's statement to be cancelled", lambda: db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone() == (0,))
        finally:
            locker.close()
        assert len(data_of(agent, "{ companies { id } }")["companies"]) == 4
    finally:
        agent.stop()


def test_query_timeout_cancels_the_statements_of_relations_too(proxy_factory: Any, recruiter_dsn: str,
                                                               db: psycopg.Connection[Any]) -> None:
    # a relation's statement runs in a batch task of the loaders, not in the operation's own tasks
    proxy = proxy_factory(upstream_dsn=recruiter_dsn, graphql__query_timeout_s=0.5)
    agent = RunningAgent(proxy)
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
               "AND wait_event_type = 'Lock' AND application_name = 'pgsidecar-graphql'")
    try:
        with psycopg.connect(recruiter_dsn) as locker:
            locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            for query in ("{ resumes(first: 2) { id user { id } } }",  # loaded ahead with the list
                          "{ resumes(first: 2) { id ... on Resume { user { id } } } }"):  # each row's future
                status, _, body = post(agent, query)
                assert status == 200 and body["data"] is None
                assert [e["extensions"]["code"] for e in body["errors"]] == ["QUERY_TIMEOUT"]
                wait_for("the relation's statement to be cancelled", lambda: db.execute(waiting).fetchone() == (0,))
        assert len(data_of(agent, "{ resumes(first: 2) { user { id } } }")["resumes"]) == 2
        assert proxy.snapshot().clients.pinned == 0  # the cancelled sessions were not pinned either
    finally:
        agent.stop()


# ----------------------------------------------------------------------------- GraphQL over HTTP
def test_get_with_a_query_string_runs_a_query(sidecar: RunningAgent) -> None:
    params = urllib.parse.urlencode({"query": "query J($id: ID!) { job(id: $id) { id } }",
                                     "variables": json.dumps({"id": "3"}), "operationName": "J"})
    status, content_type, body = raw(sidecar, "GET", f"/graphql?{params}")
    assert (status, body) == (200, {"data": {"job": {"id": "3"}}})
    assert content_type.startswith("application/json")


@pytest.mark.parametrize(("query", "variables", "message"), [
    ("{ resumes { id ", None, "Syntax Error: Expected Name, found <EOF>."),
    ("{ resumes { nope } }", None, "Cannot query field 'nope' on type 'Resume'."),
    ("query($id: ID!) { job(id: $id) { id } }", {}, "Variable '$id' of required type 'ID!' was not provided."),
    ("query($n: Int) { users(first: $n) { id } }", {"n": "many"},
     "Variable '$n' got invalid value 'many'; Int cannot represent non-integer value: 'many'"),
    ("mutation { users { id } }", None, "mutations are not supported: the GraphQL gateway is read-only"),
    ("subscription { matchCreated { id } }", None,
     "subscriptions run over WebSocket (graphql-transport-ws) at this path"),
    ("{ users " + "{ resumes " * 3000 + "{ id }" + " }" * 3001, None,
     "Syntax Error: the document is nested too deeply to parse (graphql.max_depth=8 applies anyway)"),
], ids=["syntax", "unknown-field", "missing-variable", "variable-type", "mutation", "subscription", "too-deep"])
def test_request_errors_are_200_as_json_and_400_as_graphql_response(sidecar: RunningAgent, query: str,
                                                                    variables: Any, message: str) -> None:
    status, content_type, body = post(sidecar, query, variables)
    assert status == 200 and content_type.startswith("application/json")
    assert message in [e["message"] for e in body["errors"]] and "data" not in body
    status, content_type, body = post(sidecar, query, variables, accept="application/graphql-response+json")
    assert status == 400 and content_type.startswith("application/graphql-response+json")
    assert message in [e["message"] for e in body["errors"]]


@pytest.mark.parametrize(("method", "path", "body", "content_type", "status", "message"), [
    ("POST", "/graphql", b"{not json", "application/json", 400, "the body is not valid JSON"),
    ("POST", "/graphql", b'[{"query": "{ users { id } }"}]', "application/json", 400,
     "batched requests (a JSON array) are not supported: send one object"),
    ("POST", "/graphql", b'"{ users { id } }"', "application/json", 400, "the body must be a JSON object"),
    ("POST", "/graphql", b'{"variables": {}}', "application/json", 400,
     'no query: send {"query": "..."} (a non-empty string)'),
    ("POST", "/graphql", b'{"query": 42}', "application/json", 400, 'no query: send {"query": "..."} (a non-empty string)'),
    ("POST", "/graphql", b'{"query": "{ users { id } }", "variables": [1]}', "application/json", 400,
     "variables must be an object"),
    ("POST", "/graphql", b'{"query": "{ users { id } }", "operationName": 7}', "application/json", 400,
     "operationName must be a string"),
    ("POST", "/graphql", b"{ users { id } }", "text/plain", 415,
     "POST needs Content-Type: application/json, got 'text/plain'"),
    ("GET", "/graphql?query=%7B%20users%20%7B%20id%20%7D%20%7D&variables=%7Bnope", None, None, 400,
     "variables is not valid JSON"),
    ("GET", "/graphql", None, None, 400, 'no query: send {"query": "..."} (a non-empty string)'),
    ("GET", "/graphql?query=mutation%20%7B%20users%20%7B%20id%20%7D%20%7D", None, None, 405,
     "GET only runs queries; use POST"),
    # nested deeper than the JSON parser recurses: a RecursionError, not a ValueError
    ("POST", "/graphql", b'{"query": "{ users { id } }", "variables": {"v": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}",
     "application/json", 400, "the body is not valid JSON"),
    ("GET", "/graphql?query=%7B%20users%20%7B%20id%20%7D%20%7D&variables=" + "[" * 3000 + "]" * 3000,
     None, None, 400, "variables is not valid JSON"),
], ids=["bad-json", "batch", "not-object", "no-query", "query-not-string", "variables-not-object",
        "operation-name-not-string", "content-type", "get-bad-variables", "get-no-query", "get-mutation",
        "deep-json", "get-deep-variables"])
def test_malformed_requests_are_4xx_graphql_errors(sidecar: RunningAgent, method: str, path: str, body: bytes | None,
                                                   content_type: str | None, status: int, message: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    got_status, got_type, got = raw(sidecar, method, path, body, headers)
    assert (got_status, got) == (status, {"errors": [{"message": message}]})
    assert got_type.startswith("application/json")


def test_metrics_count_operations_by_name_and_result(sidecar: RunningAgent) -> None:
    def scrape() -> list[Any]:
        return parse_samples(sidecar.request("GET", "/metrics")[2].decode())

    def count(found: list[Any], **labels: str) -> float:
        matching = [s.value for s in found if s.name == "pgsidecar_graphql_operations_total"
                    and all(s.labels.get(k) == v for k, v in labels.items())]
        return sum(matching)

    before = scrape()
    data_of(sidecar, "query CountMe { job(id: 1) { id } }")
    post(sidecar, "query CountMe { job(id: 1) { nope } }")
    post(sidecar, '{ job(id: "x") { id } }')
    after = scrape()
    assert count(after, operation="CountMe", result="ok") - count(before, operation="CountMe", result="ok") == 1
    assert count(after, operation="CountMe", result="rejected") - count(before, operation="CountMe", result="rejected") == 1
    assert count(after, operation="anonymous", result="error") - count(before, operation="anonymous", result="error") == 1
    errors = [s for s in after if s.name == "pgsidecar_graphql_resolver_errors_total" and s.labels["kind"] == "argument"]
    assert errors and errors[0].value >= 1
    assert sample_value(after, "pgsidecar_graphql_operation_duration_seconds_count", operation="CountMe") >= 1


# ----------------------------------------------------------------------------- subscriptions
async def _subscribe_and_insert(url: str, agent: RunningAgent, db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=("graphql-transport-ws",)) as ws:
        assert ws.protocol == "graphql-transport-ws"
        await ws.send_json({"type": "connection_init"})
        assert (await ws.receive_json(timeout=10)) == {"type": "connection_ack"}
        await ws.send_json({"type": "subscribe", "id": "m", "payload": {
            "query": "subscription($r: ID) { matchCreated(resume_id: $r) { id resume_id match_score job { id title } } }",
            "variables": {"r": "7"}}})
        await ws.send_json({"type": "subscribe", "id": "rc", "payload": {
            "query": "subscription { rowChanged(table: \"jobs\") { table op new old } }"}})
        await asyncio.to_thread(wait_for, "both subscriptions to be live", lambda: agent.proxy.run(
            lambda: agent.runner.app[keys.GRAPHQL].stats.subscriptions) == 2)
        # another connection (straight to PostgreSQL) inserts: a match of another resume, then one of ours
        await asyncio.to_thread(db.execute, "INSERT INTO matches (resume_id, job_id, match_score) VALUES (8, 2, 0.5)")
        await asyncio.to_thread(db.execute, "INSERT INTO matches (resume_id, job_id, match_score) VALUES (7, 3, 0.875)")
        await asyncio.to_thread(db.execute, "UPDATE jobs SET title = 'Renamed job' WHERE id = 3")
        while len(received) < 2:
            received.append(await ws.receive_json(timeout=20))
        await ws.send_json({"type": "complete", "id": "m"})
        await ws.send_json({"type": "complete", "id": "rc"})
        await asyncio.to_thread(wait_for, "the subscriptions to end", lambda: agent.proxy.run(
            lambda: agent.runner.app[keys.GRAPHQL].stats.subscriptions) == 0)
    return received


def test_a_subscription_receives_a_row_inserted_by_another_connection(sidecar: RunningAgent,
                                                                      db: psycopg.Connection[Any]) -> None:
    emitter = sidecar.runner.app[keys.WEBHOOKS]
    assert sidecar.proxy.call(emitter.wait_ready(20)), "the webhook emitter (the change feed) did not start"
    url = sidecar.url.replace("http://", "ws://") + "/graphql"
    received = asyncio.run(_subscribe_and_insert(url, sidecar, db))
    by_id = {m["id"]: m["payload"] for m in received}
    assert {m["type"] for m in received} == {"next"}
    match = by_id["m"]["data"]["matchCreated"]
    inserted = rows(db, "SELECT id, resume_id, match_score FROM matches WHERE resume_id = 7 AND job_id = 3 "
                        "AND match_score = 0.875")[0]
    assert match["id"] == inserted["id"] and match["resume_id"] == "7" and match["match_score"] == 0.875
    assert match["job"]["id"] == "3"  # a relation of the event's row, loaded for the event
    change = by_id["rc"]["data"]["rowChanged"]
    assert (change["table"], change["op"], change["new"]["title"]) == ("jobs", "update", "Renamed job")
    assert change["old"]["title"] != "Renamed job"


async def _ws_exchange(url: str, sends: list[Any], replies: int, until_close: bool,
                       protocols: tuple[str, ...] = ("graphql-transport-ws",)) -> tuple[list[Any], int | None]:
    """Send ``sends`` (dicts as JSON, str as is), read ``replies`` messages, then (``until_close``)
    wait for the server to close: (the replies, the close code or None)."""
    got: list[Any] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=protocols) as ws:
        for message in sends:
            await (ws.send_str(message) if isinstance(message, str) else ws.send_json(message))
        while len(got) < replies or until_close:
            msg = await ws.receive(timeout=20)
            if msg.type != aiohttp.WSMsgType.TEXT:
                return got, ws.close_code
            got.append(json.loads(msg.data))
        return got, None


INIT = {"type": "connection_init"}
ACK = {"type": "connection_ack"}


@pytest.mark.parametrize(("sends", "replies", "expected", "close_code"), [
    ([INIT, {"type": "ping"}, {"type": "subscribe", "id": "q", "payload": {"query": "{ job(id: 2) { id } }"}}], 4,
     [ACK, {"type": "pong"}, {"type": "next", "id": "q", "payload": {"data": {"job": {"id": "2"}}}},
      {"type": "complete", "id": "q"}], None),
    ([INIT, {"type": "subscribe", "id": "bad", "payload": {"query": "{ job(id: 2) { nope } }"}}], 2,
     [ACK, {"type": "error", "id": "bad", "payload": [{"message": "Cannot query field 'nope' on type 'Job'.",
                                                       "locations": [{"line": 1, "column": 16}]}]}], None),
    ([INIT, {"type": "subscribe", "id": "t", "payload": {"query": 'subscription { rowChanged(table: "pg_authid") { op } }'}}],
     2, [ACK, {"type": "error", "id": "t", "payload": [{
         "message": "table must be one of users, companies, resumes, jobs, matches, predictions, got 'pg_authid'",
         "locations": [{"line": 1, "column": 16}], "path": ["rowChanged"]}]}], None),
    ([{"type": "subscribe", "id": "early", "payload": {"query": "{ job(id: 2) { id } }"}}], 0, [], 4401),
    ([INIT, INIT], 1, [ACK], 4429),
    (["not json"], 0, [], 4400),
    (["[" * 100_000 + "]" * 100_000], 0, [], 4400),
    ([INIT, {"type": "subscribe", "id": "s", "payload": {"query": "subscription { matchCreated { id } }"}},
      {"type": "subscribe", "id": "s", "payload": {"query": "subscription { matchCreated { id } }"}}], 1, [ACK], 4409),
], ids=["query", "invalid", "bad-table", "subscribe-before-init", "init-twice", "not-json", "deep-json",
        "duplicate-id"])
def test_graphql_transport_ws_protocol(sidecar: RunningAgent, sends: list[Any], replies: int, expected: list[Any],
                                       close_code: int | None) -> None:
    url = sidecar.url.replace("http://", "ws://") + "/graphql"
    got, code = asyncio.run(_ws_exchange(url, sends, replies, until_close=close_code is not None))
    assert (got, code) == (expected, close_code)


def test_websocket_without_the_subprotocol_is_closed_4406(sidecar: RunningAgent) -> None:
    url = sidecar.url.replace("http://", "ws://") + "/graphql"
    assert asyncio.run(_ws_exchange(url, [INIT], 0, until_close=True, protocols=())) == ([], 4406)


async def _reuse_an_id_then_close(url: str, agent: RunningAgent, db: psycopg.Connection[Any]) -> None:
    """Complete a query that waits for a lock and at once subscribe under its id, then close the socket."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=("graphql-transport-ws",)) as ws:
        await ws.send_json(INIT)
        assert (await ws.receive_json(timeout=10)) == ACK
        await ws.send_json({"type": "subscribe", "id": "x", "payload": {"query": "{ companies { id } }"}})
        await asyncio.to_thread(wait_for, "the query to wait for the lock", lambda: db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone() == (1,))
        # its task's clean-up (cancelling the statement, releasing the session) outlives this subscribe
        await ws.send_json({"type": "complete", "id": "x"})
        await ws.send_json({"type": "subscribe", "id": "x", "payload": {
            "query": "subscription { rowChanged(table: \"users\") { op } }"}})
        await asyncio.to_thread(wait_for, "the subscription to be live", lambda: agent.proxy.run(
            lambda: agent.runner.app[keys.GRAPHQL].stats.subscriptions) == 1)
    # the socket is closed: nothing may stay subscribed to the change feed


def test_a_closed_socket_leaves_no_subscription_even_after_an_id_was_reused(sidecar: RunningAgent,
                                                                            recruiter_dsn: str) -> None:
    emitter = sidecar.runner.app[keys.WEBHOOKS]
    assert sidecar.proxy.call(emitter.wait_ready(20))
    feed = sidecar.runner.app[keys.CHANGE_FEED]
    url = sidecar.url.replace("http://", "ws://") + "/graphql"
    with psycopg.connect(recruiter_dsn) as locker, psycopg.connect(recruiter_dsn, autocommit=True) as witness:
        locker.execute("LOCK TABLE companies IN ACCESS EXCLUSIVE MODE")
        asyncio.run(_reuse_an_id_then_close(url, sidecar, witness))
    wait_for("every subscription to end and leave the change feed", lambda: sidecar.proxy.run(
        lambda: (sidecar.runner.app[keys.GRAPHQL].stats.subscriptions, feed.active)) == (0, False))


async def _subscribe_until_an_event_waits(url: str, agent: RunningAgent, db: psycopg.Connection[Any]) -> None:
    """Subscribe, have an event's relation wait for a lock, then close the socket."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=("graphql-transport-ws",)) as ws:
        await ws.send_json(INIT)
        assert (await ws.receive_json(timeout=10)) == ACK
        await ws.send_json({"type": "subscribe", "id": "w", "payload": {
            "query": "subscription { matchCreated(resume_id: 11) { id resume { user { full_name } } } }"}})
        await asyncio.to_thread(wait_for, "the subscription to be live", lambda: agent.proxy.run(
            lambda: agent.runner.app[keys.GRAPHQL].stats.subscriptions) == 1)
        await asyncio.to_thread(db.execute, "INSERT INTO matches (resume_id, job_id, match_score) VALUES (11, 4, 0.5)")
        await asyncio.to_thread(wait_for, "the event's user to wait for the lock", lambda: db.execute(
            GATEWAY_WAITING_FOR_A_LOCK).fetchone() == (1,))


GATEWAY_WAITING_FOR_A_LOCK = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                              "AND wait_event_type = 'Lock' AND application_name = 'pgsidecar-graphql'")


def test_closing_the_socket_cancels_the_statements_of_an_event_in_flight(sidecar: RunningAgent, recruiter_dsn: str,
                                                                         db: psycopg.Connection[Any]) -> None:
    emitter = sidecar.runner.app[keys.WEBHOOKS]
    assert sidecar.proxy.call(emitter.wait_ready(20))
    url = sidecar.url.replace("http://", "ws://") + "/graphql"
    with psycopg.connect(recruiter_dsn) as locker:
        locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")  # the insert's foreign keys do not need users
        asyncio.run(_subscribe_until_an_event_waits(url, sidecar, db))
        wait_for("the event's statement to be cancelled", lambda: db.execute(GATEWAY_WAITING_FOR_A_LOCK).fetchone()
                 == (0,))
    wait_for("the subscription to end", lambda: sidecar.proxy.run(
        lambda: sidecar.runner.app[keys.GRAPHQL].stats.subscriptions) == 0)
