//! Payload validation with the compiled, cached schema, next to compiling per call (the baseline).
//!
//! Run with: `cargo bench -p distributor-core --bench validation`

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use distributor_core::SchemaValidator;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

/// A typical 10-field payload type.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Payload {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    stdin: Option<String>,
    cpus: u32,
    memory_mb: u64,
    time_limit_s: Option<u64>,
    partition: String,
    priority: u8,
    labels: BTreeMap<String, String>,
}

fn bench(c: &mut Criterion) {
    let good = json!({
        "argv": ["python3", "train.py", "--epochs", "3"], "env": {"PYTHONUNBUFFERED": "1"},
        "cwd": "/work", "stdin": null, "cpus": 4, "memory_mb": 8192, "time_limit_s": 3600,
        "partition": "debug", "priority": 5, "labels": {"team": "ml"}
    });
    let bad = json!({"argv": "python3", "env": {}, "cpus": -1, "memory_mb": 1, "partition": "x", "priority": 500, "labels": {}, "extra": 1});
    let compiled = SchemaValidator::of::<Payload>();
    let schema = compiled.schema().clone();
    let mut g = c.benchmark_group("validate 10-field payload");
    g.bench_function("cached schema, valid", |b| {
        b.iter(|| {
            compiled
                .validate("payload", std::hint::black_box(&good))
                .unwrap()
        })
    });
    g.bench_function("cached schema, invalid (all violations)", |b| {
        b.iter(|| {
            compiled
                .validate("payload", std::hint::black_box(&bad))
                .unwrap_err()
        })
    });
    g.bench_function("baseline: compile per call, valid", |b| {
        b.iter(|| {
            SchemaValidator::compile(schema.clone())
                .unwrap()
                .validate("payload", std::hint::black_box(&good))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
