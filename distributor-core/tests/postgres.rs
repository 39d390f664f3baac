//! PostgreSQL: the store suite, fencing, and several engine instances on one database.
//!
//! Every trial creates a database of its own and drops it. Without a server
//! (`DISTRIBUTOR_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/test`) every trial
//! is reported ignored, with the reason printed.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use distributor_core::store::suite::{run_all, sample_record};
use distributor_core::store::{PostgresOptions, PostgresStore, Routed, Store, Write};
use distributor_core::testing::postgres::{TestDatabase, unreachable};
use distributor_core::{Error, ExecutionId, State};
use libtest_mimic::{Arguments, Failed, Trial};

type Case = fn(String) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

macro_rules! case {
    ($f:ident) => {
        (stringify!($f), |url| Box::pin($f(url)) as _)
    };
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let why = rt.block_on(unreachable());
    if let Some(why) = &why {
        eprintln!("PostgreSQL trials ignored: {why}");
    }
    let cases: Vec<(&str, Case)> = vec![
        case!(store_suite),
        case!(fenced_after_takeover),
        case!(inbox_round_trip),
    ];
    let trials = cases
        .into_iter()
        .map(|(name, f)| Trial::test(name, move || run(f)).with_ignored_flag(why.is_some()))
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

fn run(f: Case) -> Result<(), Failed> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| Failed::from(e.to_string()))?;
    rt.block_on(async {
        let db = TestDatabase::create().await?;
        let r = tokio::time::timeout(Duration::from_secs(60), f(db.url().to_owned())).await;
        db.drop().await;
        match r {
            Ok(r) => r,
            Err(_) => Err("timed out after 60 s".to_owned()),
        }
    })
    .map_err(Failed::from)
}

fn opts(instance: &str, ttl_ms: u64) -> PostgresOptions {
    PostgresOptions {
        shards: 8,
        lease_ttl: Duration::from_millis(ttl_ms),
        instance_id: Some(instance.to_owned()),
        max_connections: 4,
    }
}

/// Polls `f` until it returns true, for at most `secs` seconds.
async fn until<F: Future<Output = bool>>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> F,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn store_suite(url: String) -> Result<(), String> {
    let store = PostgresStore::connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    let shared = store.shared().ok_or("no shared handle")?;
    // Alone: the fair share is every shard.
    let round = shared.round().await.map_err(|e| e.to_string())?;
    if round.gained.len() != 64 || shared.held().len() != 64 {
        return Err(format!("alone, held {} of 64 shards", shared.held().len()));
    }
    run_all(&store).await;
    shared.leave().await.map_err(|e| e.to_string())?;
    drop(store);
    // Durable across a reconnect, and the shard count stays what the database was made with.
    let store = PostgresStore::connect_with(&url, opts("again", 1000))
        .await
        .map_err(|e| e.to_string())?;
    if store.max_id().await.map_err(|e| e.to_string())? != 1300 {
        return Err("max_id after reconnect".into());
    }
    let shared = store.shared().ok_or("no shared handle")?;
    if shared.shard_count() != 64 {
        return Err(format!(
            "shard count {} after reconnect",
            shared.shard_count()
        ));
    }
    // Writes of shards not held are refused before touching the database.
    let r = sample_record(5000, State::Queued);
    let w = Write::Insert {
        record: std::sync::Arc::new(r),
        history: vec![],
    };
    match store.apply(&[w]).await {
        Err(Error::Fenced { shard: 8 }) => {}
        other => return Err(format!("write without a lease: {other:?}")),
    }
    if store
        .meta_init("k", "first")
        .await
        .map_err(|e| e.to_string())?
        != "first"
        || store
            .meta_init("k", "second")
            .await
            .map_err(|e| e.to_string())?
            != "first"
    {
        return Err("meta_init does not keep the first value".into());
    }
    Ok(())
}

fn update(r: &mut distributor_core::ExecutionRecord, to: State) -> Write {
    r.state = to;
    r.version += 1;
    Write::Update {
        record: std::sync::Arc::new(r.clone()),
        expected_version: r.version - 1,
        history: vec![],
    }
}

/// A paused instance whose leases expired and were taken over cannot commit, even a batch it
/// had prepared while it still owned the shard; the new owner can.
async fn fenced_after_takeover(url: String) -> Result<(), String> {
    let e = |e: Error| e.to_string();
    let a = PostgresStore::connect_with(&url, opts("a", 300))
        .await
        .map_err(e)?;
    let sa = a.shared().ok_or("shared")?;
    sa.round().await.map_err(e)?;
    if sa.held().len() != 8 {
        return Err(format!("a holds {:?}", sa.held()));
    }
    let mut rec = sample_record(3, State::Queued);
    a.apply(&[Write::Insert {
        record: std::sync::Arc::new(rec.clone()),
        history: vec![],
    }])
    .await
    .map_err(e)?;
    let mut stale = rec.clone();
    // `a` pauses (no more rounds). `b` joins and, once a's leases expire, takes them over.
    let b = PostgresStore::connect_with(&url, opts("b", 300))
        .await
        .map_err(e)?;
    let sb = b.shared().ok_or("shared")?;
    until(10, "b to take shard 3 over", || {
        let sb = sb.clone();
        async move {
            let _ = sb.round().await;
            sb.held().contains(&3)
        }
    })
    .await?;
    // `a` still believes it holds shard 3; its write is fenced off and changes nothing.
    match a.apply(&[update(&mut stale, State::Dispatching)]).await {
        Err(Error::Fenced { shard: 3 }) => {}
        other => return Err(format!("stale owner's write: {other:?}")),
    }
    if sa.held().contains(&3) {
        return Err("a still lists shard 3 after being fenced".into());
    }
    let stored = b.get(ExecutionId(3)).await.map_err(e)?.ok_or("gone")?;
    if stored.state != State::Queued || stored.version != rec.version {
        return Err(format!("stale write applied: {:?}", stored.state));
    }
    // The new owner writes.
    b.apply(&[update(&mut rec, State::Dispatching)])
        .await
        .map_err(e)?;
    // And `a`, resuming, learns at its next round that it lost everything it has not renewed.
    let round = sa.round().await.map_err(e)?;
    if sa.held().iter().any(|s| sb.held().contains(s)) {
        return Err(format!(
            "both hold a shard: a {:?}, b {:?} ({round:?})",
            sa.held(),
            sb.held()
        ));
    }
    Ok(())
}

/// A command posted for a shard reaches its holder's inbox, wakes it, and is gone once acked.
async fn inbox_round_trip(url: String) -> Result<(), String> {
    let e = |e: Error| e.to_string();
    let a = PostgresStore::connect_with(&url, opts("a", 5000))
        .await
        .map_err(e)?;
    let sa = a.shared().ok_or("shared")?;
    sa.round().await.map_err(e)?;
    let b = PostgresStore::connect_with(&url, opts("b", 5000))
        .await
        .map_err(e)?;
    let sb = b.shared().ok_or("shared")?;
    // Start listening before posting (the first wakeup call connects).
    sa.wakeup(Duration::from_millis(1)).await;
    let waiter = {
        let sa = sa.clone();
        tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            sa.wakeup(Duration::from_secs(20)).await;
            t0.elapsed()
        })
    };
    sb.post(ExecutionId(13), &Routed::Cancel { reason: "r".into() })
        .await
        .map_err(e)?;
    let waited = waiter.await.map_err(|e| e.to_string())?;
    if waited >= Duration::from_secs(20) {
        return Err("NOTIFY did not wake the owner".into());
    }
    let rows = sa.inbox(&sa.held()).await.map_err(e)?;
    match rows.as_slice() {
        [(_, ExecutionId(13), Routed::Cancel { reason })] if reason == "r" => {}
        other => return Err(format!("inbox: {other:?}")),
    }
    if !sb.inbox(&[]).await.map_err(e)?.is_empty() {
        return Err("inbox of no shard".into());
    }
    sa.ack(&[rows[0].0]).await.map_err(e)?;
    if !sa.inbox(&sa.held()).await.map_err(e)?.is_empty() {
        return Err("acked row still queued".into());
    }
    Ok(())
}
