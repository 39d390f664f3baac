//! The OpenAPI 3.1 document of the HTTP API, served at `GET /v1/openapi.json`.
//!
//! The schemas of every body come from the Rust types the server parses and answers with
//! ([`SubmitRequest`], [`Submitted`], [`ExecutionView`], [`ErrorResponse`], …) through their
//! `schemars::JsonSchema` derives, so the document cannot drift from the code; the paths, their
//! parameters and status codes are listed here next to the router. Types of `distributor-core`
//! that have no schema of their own (an outcome, a history entry, a violation) are described as
//! objects. Routes that other modules merge into the router document themselves elsewhere or
//! not at all; this document covers the executions API, pushes, kinds, health and metrics.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};

use distributor_core::{AbnormalKind, State};

use crate::api::{ErrorResponse, ExecutionView, SubmitRequest, Submitted};

/// Body of `POST /v1/executions/{id}/cancel` (optional).
#[derive(Debug, Default, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// Why (default "requested over HTTP").
    #[serde(default)]
    pub reason: Option<String>,
}

fn schema_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    g.subschema_for::<T>().to_value()
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

/// The document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut g = settings.into_generator();
    let submit = schema_of::<SubmitRequest>(&mut g);
    let submitted = schema_of::<Submitted>(&mut g);
    let view = schema_of::<ExecutionView>(&mut g);
    let error = schema_of::<ErrorResponse>(&mut g);
    let cancel = schema_of::<CancelRequest>(&mut g);
    let mut schemas = Map::new();
    for (k, v) in g.take_definitions(true) {
        schemas.insert(k, v);
    }

    let err = |what: &str| json!({"description": what, "content": json_content(error.clone())});
    let errors = |codes: &[(&str, &str)]| -> Map<String, Value> {
        let mut m: Map<String, Value> = codes
            .iter()
            .map(|(c, d)| ((*c).to_owned(), err(d)))
            .collect();
        m.insert("401".into(), err("no or unknown API token"));
        m.insert(
            "403".into(),
            err("token without the scope; foreign Host or Origin"),
        );
        m.insert(
            "default".into(),
            err("any other refusal, in the same shape"),
        );
        m
    };
    let with = |mut ok: Map<String, Value>, codes: &[(&str, &str)]| {
        ok.extend(errors(codes));
        Value::Object(ok)
    };
    let id_param = json!({"name": "id", "in": "path", "required": true,
        "description": "an execution id",
        "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX}});
    let u64_schema = json!({"type": "integer", "minimum": 0, "maximum": u64::MAX});
    let states: Vec<String> = State::LIVE
        .into_iter()
        .chain([State::Succeeded])
        .chain(AbnormalKind::ALL.map(State::Abnormal))
        .map(|s| s.as_str().to_owned())
        .collect();
    let one = format!("({})", states.join("|"));
    let state_pattern = format!("^({one}(,{one})*)?$");
    let q = |name: &str, desc: &str, schema: Value| json!({"name": name, "in": "query", "required": false, "description": desc, "schema": schema});
    let ok = |code: &str, desc: &str, schema: Value| -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            code.into(),
            json!({"description": desc, "content": json_content(schema)}),
        );
        m
    };
    let public = json!([]);

    let mut submit_ok = ok("201", "submitted", submitted.clone());
    submit_ok.insert(
        "200".into(),
        json!({"description": "already submitted with this idempotency key: the first id",
               "content": json_content(submitted.clone())}),
    );

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "distributor reference orchestrator",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Submit work to distributors and follow it. Every route but the \
                public ones needs `Authorization: Bearer <token>` with the scope the route \
                names; request bodies are `application/json`, at most the server's body limit."
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                    "description": "an API token; scopes: read, submit, cancel, admin"}
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {
                "summary": "liveness: the store answers",
                "security": public,
                "responses": {
                    "200": {"description": "ok", "content": json_content(json!({
                        "type": "object", "required": ["status"],
                        "properties": {"status": {"const": "ok"}}}))},
                    "503": err("the store does not answer"),
                    "default": err("a refusal")
                }
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics",
                "security": public,
                "responses": {
                    "200": {"description": "Prometheus text",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "default": err("a refusal")
                }
            }},
            "/v1/openapi.json": {"get": {
                "summary": "this document",
                "security": public,
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": json_content(json!({"type": "object"}))},
                    "default": err("a refusal")
                }
            }},
            "/v1/kinds": {"get": {
                "summary": "registered kinds, their config and payload schemas (scope read)",
                "responses": with(ok("200", "the kinds", json!({
                    "type": "object", "required": ["kinds"],
                    "properties": {"kinds": {"type": "array", "items": {"type": "object"}}}})), &[])
            }},
            "/v1/executions": {
                "post": {
                    "summary": "submit a task (scope submit)",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false,
                        "description": "a resubmission with the same key answers the first id",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 256}}],
                    "requestBody": {"required": true, "content": json_content(submit)},
                    "responses": with(submit_ok, &[
                        ("400", "malformed body, naming the field"),
                        ("413", "body over the limit"),
                        ("415", "not application/json"),
                        ("422", "invalid payload or unknown distributor"),
                        ("503", "the engine is unavailable"),
                    ])
                },
                "get": {
                    "summary": "list executions (scope read)",
                    "parameters": [
                        q("state", "comma-separated states",
                            json!({"type": "string", "pattern": state_pattern})),
                        q("distributor", "instance name", json!({"type": "string"})),
                        q("label", "key=value",
                            json!({"type": "string", "pattern": "^[^=]+=[^=]*$"})),
                        q("task_id", "task id", u64_schema.clone()),
                        q("after", "ids above this one", u64_schema.clone()),
                        q("limit", "at most this many", u64_schema.clone()),
                    ],
                    "responses": with(ok("200", "the executions", json!({
                        "type": "object", "required": ["executions"],
                        "properties": {"executions": {"type": "array", "items": view.clone()}}})),
                        &[("400", "a bad query parameter, named")])
                }
            },
            "/v1/executions/{id}": {"get": {
                "summary": "one execution with its history (scope read)",
                "parameters": [id_param.clone()],
                "responses": with(ok("200", "the execution", view.clone()),
                    &[("400", "not an id"), ("404", "no such execution")])
            }},
            "/v1/executions/{id}/cancel": {"post": {
                "summary": "cancel the task's current attempt (scope cancel)",
                "parameters": [id_param.clone()],
                "requestBody": {"required": false, "content": json_content(cancel)},
                "responses": with(ok("202", "cancellation requested", view),
                    &[("400", "not an id, or a bad body"), ("404", "no such execution"),
                      ("415", "not application/json")])
            }},
            "/v1/executions/{id}/poke": {"post": {
                "summary": "poll the backend now (scope submit)",
                "parameters": [id_param],
                "responses": with(ok("202", "poked", json!({
                    "type": "object", "required": ["poked"],
                    "properties": {"poked": {"type": "integer"}}})),
                    &[("400", "not an id"), ("404", "no such execution")])
            }},
            "/v1/notify": {"post": {
                "summary": "a push from a backend: Pub/Sub push JSON or plain JSON; \
                    authenticated by its per-execution auth_token, not by an API token",
                "security": public,
                "requestBody": {"required": true, "content": json_content(json!({"anyOf": [
                    {"title": "Pub/Sub push", "type": "object",
                     "description": "Google Pub/Sub's push envelope. Any object is taken as \
                        one: a malformed envelope is acknowledged (200, accepted false) so \
                        that Pub/Sub does not redeliver it",
                     "examples": [{"message": {"data": "eyJzdGF0dXMiOiAicnVubmluZyJ9",
                        "attributes": {"execution_id": "1", "auth_token": "v1.1.0.00",
                            "sequence": "1"}, "messageId": "m1"},
                        "subscription": "projects/p/subscriptions/s"}]},
                    {"title": "plain push", "type": "object", "required": ["execution_id"],
                     "additionalProperties": false,
                     "properties": {
                        "execution_id": u64_schema.clone(),
                        "data": {},
                        "attributes": {"type": "object",
                            "additionalProperties": {"type": "string"}},
                        "sequence": u64_schema.clone(),
                        "message_id": {"type": "string"}}}
                ]}))},
                "responses": {
                    "200": {"description": "accepted, or acknowledged without effect \
                        (stale, or a Pub/Sub push that can never succeed)",
                        "content": json_content(json!({
                            "type": "object", "required": ["accepted"],
                            "properties": {"accepted": {"type": "boolean"},
                                "reason": {"type": "string"},
                                "error": {"type": "object"}}}))},
                    "400": err("malformed plain push"),
                    "401": err("plain push without a token"),
                    "403": err("plain push with a forged, expired or foreign token"),
                    "404": err("no such execution"),
                    "503": err("transient: redeliver"),
                    "default": err("a refusal")
                }
            }}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn every_ref_resolves_and_the_body_types_are_in_it() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let ptr = r.strip_prefix('#').expect("local ref");
            assert!(doc.pointer(ptr).is_some(), "dangling {r}");
        }
        for t in [
            "SubmitRequest",
            "Submitted",
            "ExecutionView",
            "ErrorResponse",
            "ErrorBody",
        ] {
            assert!(doc["components"]["schemas"][t].is_object(), "{t}");
        }
        let props = &doc["components"]["schemas"]["SubmitRequest"]["properties"];
        assert!(
            props["request_id"].is_object() && props["payload"].is_object(),
            "{props}"
        );
    }
}
