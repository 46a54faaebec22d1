"""The gateway's GraphQL schema, code-first with graphql-core: the recruiter tables as types
(field names are the column names), relations both ways, the seed's queries and the
subscriptions. ``build_schema()`` returns it; ``schema.graphql`` beside this file is its printed
form (a test keeps the two equal: regenerate with ``python -m graphql_gateway.schema``).

Ids are ``ID``s. Every list is ``[T!]!`` with ``first`` (default ``graphql.default_page_size``,
at most ``graphql.max_page_size``) and ``after`` (keyset: the last id seen). Filters and orders
are on indexed columns only (migrations/versions/0002_seed_indices.py).
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from graphql import (
    GraphQLArgument,
    GraphQLEnumType,
    GraphQLEnumValue,
    GraphQLField,
    GraphQLFloat,
    GraphQLID,
    GraphQLInt,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    GraphQLString,
    print_schema,
)

from . import resolvers as r

SCHEMA_FILE = Path(__file__).with_name("schema.graphql")

__all__ = ["SCHEMA_FILE", "build_schema"]


def _serialize_datetime(value: Any) -> str:
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    return str(value)  # rows from the change feed carry the JSON text already


DATETIME = GraphQLScalarType(
    "DateTime", description="A timestamp with time zone, as ISO 8601 text.", serialize=_serialize_datetime,
    parse_value=lambda v: datetime.datetime.fromisoformat(str(v)))
JSON = GraphQLScalarType("JSON", description="Any JSON value (a jsonb column, a changed row).")
MATCH_ORDER = GraphQLEnumType("MatchOrder", {
    "ID": GraphQLEnumValue("id", description="By id (keyset pagination with `after`)."),
    "MATCH_SCORE_DESC": GraphQLEnumValue(
        "match_score_desc", description="Best score first (index idx_match_score); `after` does not apply."),
}, description="How a list of matches is ordered.")


def _nn(t: Any) -> GraphQLNonNull[Any]:
    return GraphQLNonNull(t)


def _list(t: Any) -> GraphQLNonNull[Any]:
    return _nn(GraphQLList(_nn(t)))


def _field(t: Any, description: str, **kw: Any) -> GraphQLField:
    return GraphQLField(t, description=description, **kw)


def _id_arg(description: str) -> GraphQLArgument:
    return GraphQLArgument(_nn(GraphQLID), description=description)


def _page_args(**extra: GraphQLArgument) -> dict[str, GraphQLArgument]:
    return {
        "first": GraphQLArgument(GraphQLInt, description=(
            "Rows to return (default graphql.default_page_size, at most graphql.max_page_size).")),
        "after": GraphQLArgument(GraphQLID, description="Return rows with an id greater than this (the last id seen)."),
        **extra,
    }


def _match_args() -> dict[str, GraphQLArgument]:
    return _page_args(
        min_score=GraphQLArgument(GraphQLFloat, description="Only matches with match_score >= this."),
        order=GraphQLArgument(MATCH_ORDER, description="Order of the list (default ID)."),
    )


def _created_at(what: str) -> GraphQLField:
    return _field(_nn(DATETIME), f"When the {what} was created.")


def build_schema() -> GraphQLSchema:
    """The gateway's schema (a new object per call: no module-level state)."""
    user: GraphQLObjectType
    company: GraphQLObjectType
    resume: GraphQLObjectType
    job: GraphQLObjectType
    match: GraphQLObjectType
    prediction: GraphQLObjectType

    user = GraphQLObjectType("User", lambda: {
        "id": _field(_nn(GraphQLID), "The user's id."),
        "email": _field(_nn(GraphQLString), "The user's e-mail address."),
        "full_name": _field(_nn(GraphQLString), "The user's full name."),
        "location": _field(GraphQLString, "Where the user lives or works."),
        "created_at": _created_at("user"),
        "resumes": _field(_list(resume), "The user's resumes.", args=_page_args(),
                          resolve=r.children("resumes", "user_id")),
    }, description="A person using the recruiter app (table users).")

    company = GraphQLObjectType("Company", lambda: {
        "id": _field(_nn(GraphQLID), "The company's id."),
        "name": _field(_nn(GraphQLString), "The company's name."),
        "industry": _field(GraphQLString, "The company's industry."),
        "created_at": _created_at("company"),
        "jobs": _field(_list(job), "The company's job offers.", args=_page_args(),
                       resolve=r.children("jobs", "company_id")),
    }, description="An employer (table companies).")

    resume = GraphQLObjectType("Resume", lambda: {
        "id": _field(_nn(GraphQLID), "The resume's id."),
        "user_id": _field(_nn(GraphQLID), "Id of the user the resume belongs to."),
        "title": _field(_nn(GraphQLString), "The resume's headline."),
        "summary": _field(GraphQLString, "Free-text summary."),
        "skills": _field(_list(GraphQLString), "Skills listed on the resume."),
        "experience_years": _field(_nn(GraphQLInt), "Years of experience."),
        "created_at": _created_at("resume"),
        "user": _field(_nn(user), "The user the resume belongs to.", resolve=r.parent("users", "user_id")),
        "matches": _field(_list(match), "Jobs matched to this resume.", args=_match_args(),
                          resolve=r.children("matches", "resume_id", scored=True)),
        "predictions": _field(_list(prediction), "Model predictions for this resume.", args=_page_args(),
                              resolve=r.children("predictions", "resume_id")),
    }, description="A user's resume (table resumes).")

    job = GraphQLObjectType("Job", lambda: {
        "id": _field(_nn(GraphQLID), "The job's id."),
        "company_id": _field(_nn(GraphQLID), "Id of the company offering the job."),
        "title": _field(_nn(GraphQLString), "The job's title."),
        "description": _field(GraphQLString, "The job's description."),
        "required_skills": _field(_list(GraphQLString), "Skills the job requires."),
        "salary_min": _field(GraphQLInt, "Lower end of the salary range."),
        "salary_max": _field(GraphQLInt, "Upper end of the salary range."),
        "created_at": _created_at("job"),
        "company": _field(_nn(company), "The company offering the job.", resolve=r.parent("companies", "company_id")),
        "matches": _field(_list(match), "Resumes matched to this job.", args=_match_args(),
                          resolve=r.children("matches", "job_id", scored=True)),
        "predictions": _field(_list(prediction), "Model predictions for this job.", args=_page_args(),
                              resolve=r.children("predictions", "job_id")),
    }, description="A job offer (table jobs).")

    match = GraphQLObjectType("Match", lambda: {
        "id": _field(_nn(GraphQLID), "The match's id."),
        "resume_id": _field(_nn(GraphQLID), "Id of the matched resume."),
        "job_id": _field(_nn(GraphQLID), "Id of the matched job."),
        "match_score": _field(_nn(GraphQLFloat), "How well resume and job match, 0 to 1."),
        "created_at": _created_at("match"),
        "resume": _field(_nn(resume), "The matched resume.", resolve=r.parent("resumes", "resume_id")),
        "job": _field(_nn(job), "The matched job.", resolve=r.parent("jobs", "job_id")),
    }, description="A resume matched to a job (table matches).")

    prediction = GraphQLObjectType("Prediction", lambda: {
        "id": _field(_nn(GraphQLID), "The prediction's id."),
        "resume_id": _field(_nn(GraphQLID), "Id of the resume the prediction is about."),
        "job_id": _field(_nn(GraphQLID), "Id of the job the prediction is about."),
        "model_version": _field(_nn(GraphQLString), "Version of the model that made the prediction."),
        "predicted_score": _field(_nn(GraphQLFloat), "The predicted score."),
        "features": _field(_nn(JSON), "The features the model used (jsonb)."),
        "created_at": _created_at("prediction"),
        "resume": _field(_nn(resume), "The resume.", resolve=r.parent("resumes", "resume_id")),
        "job": _field(_nn(job), "The job.", resolve=r.parent("jobs", "job_id")),
    }, description="A model's predicted score of a resume for a job (table predictions).")

    row_change = GraphQLObjectType("RowChange", {
        "id": _field(_nn(GraphQLID), "The change event's id (the webhook emitter's outbox id)."),
        "event_type": _field(_nn(GraphQLString), "The event type, e.g. \"resumes.update\"."),
        "table": _field(_nn(GraphQLString), "The table the row belongs to."),
        "op": _field(_nn(GraphQLString), "insert, update or delete."),
        "new": _field(JSON, "The row after the change (null for a delete)."),
        "old": _field(JSON, "The row before the change (null for an insert)."),
        "created_at": _created_at("change event"),
    }, description="A change to a row of a recruiter table, from the change feed.")

    query = GraphQLObjectType("Query", {
        "user": _field(user, "One user by id (null when there is none).", args={"id": _id_arg("The user's id.")},
                       resolve=r.user),
        "users": _field(_list(user), "Users in id order.", args=_page_args(
            email=GraphQLArgument(GraphQLString, description="Only the user with this e-mail address.")),
            resolve=r.users),
        "resume": _field(resume, "One resume by id.", args={"id": _id_arg("The resume's id.")}, resolve=r.resume),
        "resumes": _field(_list(resume), "Resumes in id order.", args=_page_args(
            user_id=GraphQLArgument(GraphQLID, description="Only this user's resumes.")), resolve=r.resumes),
        "job": _field(job, "One job by id.", args={"id": _id_arg("The job's id.")}, resolve=r.job),
        "jobs": _field(_list(job), "Jobs in id order.", args=_page_args(
            company_id=GraphQLArgument(GraphQLID, description="Only this company's jobs.")), resolve=r.jobs),
        "company": _field(company, "One company by id.", args={"id": _id_arg("The company's id.")},
                          resolve=r.company),
        "companies": _field(_list(company), "Companies in id order.", args=_page_args(), resolve=r.companies),
        "matches": _field(_list(match), "A resume's matches.", args={
            "resume_id": _id_arg("The resume whose matches to return."), **_match_args()}, resolve=r.matches),
        "predictions": _field(_list(prediction), "A resume's predictions.", args={
            "resume_id": _id_arg("The resume whose predictions to return."), **_page_args()},
            resolve=r.predictions),
    }, description="Read-only queries over the recruiter tables (through the proxy's pool).")

    subscription = GraphQLObjectType("Subscription", {
        "matchCreated": _field(_nn(match), "Each match inserted (for one resume when resume_id is given).", args={
            "resume_id": GraphQLArgument(GraphQLID, description="Only matches of this resume.")},
            subscribe=r.match_created, resolve=r.event_row),
        "rowChanged": _field(_nn(row_change), "Each insert, update or delete of a row of one table.", args={
            "table": GraphQLArgument(_nn(GraphQLString), description="users, companies, resumes, jobs, matches "
                                     "or predictions.")},
            subscribe=r.row_changed, resolve=r.event_itself),
    }, description="Live changes over WebSocket (graphql-transport-ws), fed by the webhook emitter's change feed.")

    return GraphQLSchema(query=query, subscription=subscription)


def printed() -> str:
    """The schema in SDL, as checked in at ``schema.graphql``."""
    return print_schema(build_schema()) + "\n"


if __name__ == "__main__":  # python -m graphql_gateway.schema > graphql_gateway/schema.graphql
    print(printed(), end="")
