//! Several engine instances on one PostgreSQL: durable lifecycles per second with 1, 2 and 4
//! instances (fake adapter), next to raw PostgreSQL inserting and updating the same rows in
//! the same run.
//!
//! Run with: `cargo bench -p distributor-core --features testing,postgres --bench postgres`
//! (`-- --quick` for 10k lifecycles instead of 40k). The server is `DISTRIBUTOR_TEST_POSTGRES`
//! (default `postgres://postgres@127.0.0.1:5432/test`); each measurement runs in a database of
//! its own, dropped afterwards.
//!
//! A lifecycle is submit → run → push Running → push Finished → terminal: one insert and four
//! compare-and-set updates of the execution row, five history rows, each committed (group
//! commit) before anything that depends on it, plus the fencing check of every batch.

use std::time::{Duration, Instant};

use distributor_core::store::{PostgresOptions, PostgresStore, Store};
use distributor_core::testing::FakeConfig;
use distributor_core::testing::postgres::{TestDatabase, unreachable};
use distributor_core::*;
use serde_json::json;

const TRANSITIONS_PER_LIFECYCLE: i64 = 5;

async fn instances(url: &str, k: usize, backend: &str) -> Vec<(Engine, PostgresStore)> {
    let registry = Registry::new().register::<FakeConfig>().unwrap();
    let doc = json!({"distributors": {"fake": {"kind": "fake", "backend": backend}}});
    let config = DistributorsConfig::from_value(&registry, "bench", &doc).unwrap();
    let mut out = Vec::new();
    for i in 0..k {
        let store = PostgresStore::connect_with(
            url,
            PostgresOptions {
                instance_id: Some(format!("bench-{i}")),
                ..PostgresOptions::default()
            },
        )
        .await
        .unwrap();
        let engine = Engine::builder()
            .registry(registry.clone())
            .distributors(config.clone())
            .store(store.clone())
            .build()
            .await
            .unwrap();
        out.push((engine, store));
    }
    // Wait for the shards to be shared out evenly (every instance holds its fair share).
    let fair = 64usize.div_ceil(k);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held: Vec<usize> = out
            .iter()
            .map(|(_, s)| s.shared().map_or(0, |h| h.held().len()))
            .collect();
        if held.iter().sum::<usize>() == 64 && held.iter().all(|h| *h + 1 >= fair) {
            break;
        }
        assert!(Instant::now() < deadline, "shards not shared out: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

/// `n` lifecycles spread over the instances: 16 submitters in all, each submitting chunks of 64
/// to its instance and keeping up to 4 chunks in flight, each execution waited for (as in the
/// engine bench).
async fn lifecycles(url: &str, k: usize, n: usize, backend: &str) -> Duration {
    let inst = instances(url, k, backend).await;
    let workers = 16;
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for w in 0..workers {
        let e = inst[w % k].0.clone();
        let per = n / workers + usize::from(w < n % workers);
        joins.push(tokio::spawn(async move {
            let mut window = std::collections::VecDeque::new();
            let mut left = per;
            while left > 0 || !window.is_empty() {
                if left > 0 && window.len() < 4 {
                    let c = left.min(64);
                    left -= c;
                    window.push_back(
                        e.submit_many(vec![Task::new("fake", json!({})); c])
                            .await
                            .unwrap(),
                    );
                    continue;
                }
                for id in window.pop_front().unwrap_or_default() {
                    let r = e.wait(id).await.unwrap();
                    assert_eq!(r.state, State::Succeeded);
                }
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let d = t0.elapsed();
    for (e, _) in &inst {
        e.shutdown().await;
    }
    let done = inst[0]
        .1
        .list(&distributor_core::store::ListFilter {
            states: vec![State::Succeeded],
            limit: Some(n + 1),
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
    assert_eq!(done, n, "every lifecycle stored as succeeded");
    d
}

/// The baseline: the same rows (an insert and four compare-and-set updates each, about the
/// size of a stored record, with one history row per change) written by raw sqlx with UNNEST
/// statements, 512 rows per transaction, from `k` connections at once.
async fn raw(url: &str, n: usize, k: usize) -> Duration {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(k as u32)
        .connect(url)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE t (id BIGINT PRIMARY KEY, state TEXT, version BIGINT, record JSONB) \
         WITH (fillfactor = 70); \
         CREATE TABLE h (id BIGINT, version BIGINT, entry JSONB, PRIMARY KEY (id, version))",
    )
    .execute(&pool)
    .await
    .unwrap();
    let record = serde_json::to_string(&json!({"pad": "x".repeat(900)})).unwrap();
    let entry = serde_json::to_string(&json!({"pad": "x".repeat(120)})).unwrap();
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for w in 0..k {
        let pool = pool.clone();
        let (record, entry) = (record.clone(), entry.clone());
        joins.push(tokio::spawn(async move {
            let ids: Vec<i64> = (0..n as i64).filter(|i| *i as usize % k == w).collect();
            for chunk in ids.chunks(512) {
                let recs = vec![record.clone(); chunk.len()];
                let entries = vec![entry.clone(); chunk.len()];
                for v in 1..=TRANSITIONS_PER_LIFECYCLE {
                    let vs = vec![v; chunk.len()];
                    let mut tx = pool.begin().await.unwrap();
                    if v == 1 {
                        sqlx::query(
                            "INSERT INTO t SELECT u.id, 'queued', 1, u.r::jsonb \
                             FROM UNNEST($1::int8[], $2::text[]) AS u(id, r)",
                        )
                        .bind(chunk)
                        .bind(&recs)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    } else {
                        let done = sqlx::query(
                            "UPDATE t SET state = 's', version = u.v, record = u.r::jsonb \
                             FROM UNNEST($1::int8[], $2::int8[], $3::text[]) AS u(id, v, r) \
                             WHERE t.id = u.id AND t.version = u.v - 1",
                        )
                        .bind(chunk)
                        .bind(&vs)
                        .bind(&recs)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                        assert_eq!(done.rows_affected(), chunk.len() as u64);
                    }
                    sqlx::query(
                        "INSERT INTO h SELECT u.id, u.v, u.e::jsonb \
                         FROM UNNEST($1::int8[], $2::int8[], $3::text[]) AS u(id, v, e)",
                    )
                    .bind(chunk)
                    .bind(&vs)
                    .bind(&entries)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    tx.commit().await.unwrap();
                }
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    t0.elapsed()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 10_000 } else { 40_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if let Some(why) = unreachable().await {
            println!("postgres bench skipped: {why}");
            return;
        }
        println!("postgres bench: {n} lifecycles per measurement, 2 runs each, best kept\n");
        let mut per_k = Vec::new();
        for k in [1usize, 2, 4] {
            let mut best = Duration::MAX;
            for run in 0..2 {
                let db = TestDatabase::create().await.unwrap();
                best = best.min(lifecycles(db.url(), k, n, &format!("bench-pg-{k}-{run}")).await);
                db.drop().await;
            }
            let rate = n as f64 / best.as_secs_f64();
            per_k.push(rate);
            println!(
                "{k} instance{}: {:>8.0} lifecycles/s  ({:.2?} for {n})   vs 1 instance {:.2}x",
                if k == 1 { " " } else { "s" },
                rate,
                best,
                rate / per_k[0]
            );
        }
        for k in [1usize, 4] {
            let mut best = Duration::MAX;
            for _ in 0..2 {
                let db = TestDatabase::create().await.unwrap();
                best = best.min(raw(db.url(), n, k).await);
                db.drop().await;
            }
            println!(
                "raw PostgreSQL, {k} connection{}: {:>8.0} rows/s (1 insert + 4 updates + 5 history rows each, 512 per transaction)  ({:.2?})   1-instance engine / raw time ratio {:.1}x",
                if k == 1 { "" } else { "s" },
                n as f64 / best.as_secs_f64(),
                best,
                per_k[0].recip() * n as f64 / best.as_secs_f64()
            );
        }
    });
}
