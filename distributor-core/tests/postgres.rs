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
use distributor_core::testing::{FakeBackend, FakeConfig};
use distributor_core::{
    DistributorsConfig, Engine, Error, ExecutionId, Notification, Outcome, Registry, Settings,
    State, Status, Task,
};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::json;

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
        case!(one_statement_commits_or_nothing),
        case!(work_submitted_anywhere_finishes_once),
        case!(killed_instance_is_taken_over),
        case!(notify_and_cancel_reach_the_owner),
        case!(graceful_shutdown_hands_shards_over),
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

/// The engine's usual batch (every record once) commits as one statement, for real; a stale
/// row or a lost shard in it writes nothing, and the error names the record or the shard.
async fn one_statement_commits_or_nothing(url: String) -> Result<(), String> {
    let e = |e: Error| e.to_string();
    let a = PostgresStore::connect_with(&url, opts("a", 300))
        .await
        .map_err(e)?;
    let sa = a.shared().ok_or("shared")?;
    sa.round().await.map_err(e)?;
    let mut r1 = sample_record(1, State::Queued);
    let mut r2 = sample_record(2, State::Queued);
    let ins = |r: &distributor_core::ExecutionRecord| Write::Insert {
        record: std::sync::Arc::new(r.clone()),
        history: vec![],
    };
    a.apply(&[ins(&r1), ins(&r2)]).await.map_err(e)?;
    a.apply(&[
        update(&mut r1, State::Dispatching),
        update(&mut r2, State::Dispatching),
    ])
    .await
    .map_err(e)?;
    if a.commit_counts() != (2, 0) {
        return Err(format!(
            "commits {:?}, expected 2 in one statement",
            a.commit_counts()
        ));
    }
    // A stale update after a good one: nothing applied, the stale record named.
    let mut stale = r2.clone();
    stale.version = 7;
    let good = update(&mut r1, State::Pending);
    match a.apply(&[good, update(&mut stale, State::Pending)]).await {
        Err(Error::Conflict(ExecutionId(2))) => {}
        other => return Err(format!("stale batch: {other:?}")),
    }
    let v1 = a
        .get(ExecutionId(1))
        .await
        .map_err(e)?
        .ok_or("gone")?
        .version;
    if v1 != 2 {
        return Err(format!("partial batch applied: version {v1}"));
    }
    // A duplicate insert next to a new one: nothing applied.
    let r3 = sample_record(3, State::Queued);
    match a.apply(&[ins(&r3), ins(&r2)]).await {
        Err(Error::Conflict(ExecutionId(2))) => {}
        other => return Err(format!("duplicate insert: {other:?}")),
    }
    if a.get(ExecutionId(3)).await.map_err(e)?.is_some() {
        return Err("insert of a refused batch applied".into());
    }
    // The same record twice in a batch takes the transaction path.
    let mut r4 = sample_record(4, State::Queued);
    let w = ins(&r4);
    a.apply(&[w, update(&mut r4, State::Dispatching)])
        .await
        .map_err(e)?;
    if a.commit_counts() != (2, 1) {
        return Err(format!("commits {:?}, expected (2, 1)", a.commit_counts()));
    }
    // A lost shard: the one-statement write is fenced off like the transaction.
    let b = PostgresStore::connect_with(&url, opts("b", 300))
        .await
        .map_err(e)?;
    let sb = b.shared().ok_or("shared")?;
    until(10, "b to take shard 1 over", || {
        let sb = sb.clone();
        async move {
            let _ = sb.round().await;
            sb.held().contains(&1)
        }
    })
    .await?;
    r1.version = 2;
    match a.apply(&[update(&mut r1, State::Pending)]).await {
        Err(Error::Fenced { shard: 1 }) => {}
        other => return Err(format!("stale owner's one-statement write: {other:?}")),
    }
    if a.commit_counts() != (2, 1) {
        return Err(format!("commits {:?} after refusals", a.commit_counts()));
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

// ----- several engine instances on one database ------------------------------------------

fn registry() -> Registry {
    Registry::new().register::<FakeConfig>().expect("registry")
}

fn fast_settings() -> Settings {
    Settings {
        poll_interval: Duration::from_millis(50),
        hedge_poll_interval: Duration::from_millis(200),
        cancel_poll_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        ..Settings::default()
    }
}

/// An engine instance on the database at `url`, with the fake backend `backend` (shared by
/// every instance in the process, as a real backend is shared by every orchestrator replica).
async fn instance(
    url: &str,
    name: &str,
    backend: &str,
    ttl_ms: u64,
) -> Result<(Engine, PostgresStore), String> {
    let store = PostgresStore::connect_with(url, opts(name, ttl_ms))
        .await
        .map_err(|e| e.to_string())?;
    let doc = json!({"distributors": {"fake": {"kind": "fake", "backend": backend}}});
    let config =
        DistributorsConfig::from_value(&registry(), "test", &doc).map_err(|e| e.to_string())?;
    let engine = Engine::builder()
        .registry(registry())
        .distributors(config)
        .settings(fast_settings())
        .store(store.clone())
        .build()
        .await
        .map_err(|e| e.to_string())?;
    Ok((engine, store))
}

fn held(s: &PostgresStore) -> Vec<u32> {
    s.shared().map(|h| h.held()).unwrap_or_default()
}

/// Waits until the instances hold every shard between them, each at least one, none twice.
async fn balanced(stores: &[&PostgresStore]) -> Result<(), String> {
    until(20, "the shards to be shared out", || async {
        let all: Vec<Vec<u32>> = stores.iter().map(|s| held(s)).collect();
        let mut flat: Vec<u32> = all.iter().flatten().copied().collect();
        flat.sort_unstable();
        flat.dedup();
        all.iter().all(|h| !h.is_empty())
            && flat.len() == 8
            && all.iter().map(Vec::len).sum::<usize>() == 8
    })
    .await
}

/// Every execution of the database: one per task, and each started once at the backend.
async fn each_ran_once(
    store: &PostgresStore,
    fake: &FakeBackend,
    tasks: usize,
) -> Result<(), String> {
    let all = store
        .list(&distributor_core::store::ListFilter::default())
        .await
        .map_err(|e| e.to_string())?;
    if all.len() != tasks {
        return Err(format!("{} executions for {tasks} tasks", all.len()));
    }
    for r in &all {
        if r.state != State::Succeeded {
            return Err(format!("execution {} ended {:?}", r.id, r.state));
        }
        let n = fake.starts(&r.request_id);
        if n != 1 {
            return Err(format!("execution {} was started {n} times", r.id));
        }
    }
    Ok(())
}

/// Three instances: tasks submitted to any of them finish, exactly once each, and each
/// instance can wait for work another instance owns.
async fn work_submitted_anywhere_finishes_once(url: String) -> Result<(), String> {
    let backend = format!("pg-anywhere-{}", uuid::Uuid::new_v4());
    let (a, sa) = instance(&url, "a", &backend, 1000).await?;
    let (b, sb) = instance(&url, "b", &backend, 1000).await?;
    let (c, sc) = instance(&url, "c", &backend, 1000).await?;
    balanced(&[&sa, &sb, &sc]).await?;
    let engines = [&a, &b, &c];
    let mut ids = Vec::new();
    for i in 0..30 {
        let e = engines[i % 3];
        let id = e
            .submit(Task::new("fake", json!({"run_for_ms": 20})))
            .await
            .map_err(|e| e.to_string())?;
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        // Waited for on another instance than the one that took it.
        let rec = engines[(i + 1) % 3]
            .wait_task(*id)
            .await
            .map_err(|e| e.to_string())?;
        if rec.state != State::Succeeded {
            return Err(format!("{id} ended {:?}", rec.state));
        }
    }
    each_ran_once(&sa, &FakeBackend::named(&backend), 30).await?;
    for e in engines {
        e.shutdown().await;
    }
    Ok(())
}

/// An instance dropped without shutdown (a crash) mid-flight: once its leases expire the other
/// takes its executions over, as a restart would, and each finishes; none is started twice.
async fn killed_instance_is_taken_over(url: String) -> Result<(), String> {
    let backend = format!("pg-kill-{}", uuid::Uuid::new_v4());
    let fake = FakeBackend::named(&backend);
    let (a, sa) = instance(&url, "a", &backend, 1000).await?;
    let (b, sb) = instance(&url, "b", &backend, 1000).await?;
    balanced(&[&sa, &sb]).await?;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            a.submit(Task::new(
                "fake",
                json!({"pending_for_ms": 200, "run_for_ms": 1500}),
            ))
            .await
            .map_err(|e| e.to_string())?,
        );
    }
    // All launched at the backend, none finished: then `a` dies.
    until(10, "every task launched", || async {
        let mut n = 0;
        for id in &ids {
            if let Ok(r) = b.get(*id).await
                && matches!(r.state, State::Pending | State::Running)
            {
                n += 1;
            }
        }
        n == ids.len()
    })
    .await?;
    let a_shards = held(&sa);
    drop(a);
    drop(sa);
    for id in &ids {
        let rec = b.wait_task(*id).await.map_err(|e| e.to_string())?;
        if rec.state != State::Succeeded {
            return Err(format!("{id} ended {:?}", rec.state));
        }
    }
    let now_b = held(&sb);
    if !a_shards.iter().all(|s| now_b.contains(s)) {
        return Err(format!("b holds {now_b:?}, not all of a's {a_shards:?}"));
    }
    // New work on the survivor lands in every shard, those taken over included, without
    // colliding with the ids the dead instance used there.
    for _ in 0..16 {
        let id = b
            .submit(Task::new("fake", json!({"run_for_ms": 10})))
            .await
            .map_err(|e| e.to_string())?;
        let rec = b.wait_task(id).await.map_err(|e| e.to_string())?;
        if rec.state != State::Succeeded {
            return Err(format!("{id} ended {:?}", rec.state));
        }
    }
    each_ran_once(&sb, &fake, 36).await?;
    b.shutdown().await;
    Ok(())
}

fn push(token: &str, status: Status, seq: u64) -> Notification {
    let mut n = Notification::json(&serde_json::to_value(status).unwrap_or_default());
    n.attributes.insert("auth_token".into(), token.into());
    n.sequence = Some(seq);
    n
}

/// A push and a cancellation sent to an instance that does not own the execution reach the
/// owner (through the database) and are applied there.
async fn notify_and_cancel_reach_the_owner(url: String) -> Result<(), String> {
    let backend = format!("pg-notify-{}", uuid::Uuid::new_v4());
    let fake = FakeBackend::named(&backend);
    let (a, sa) = instance(&url, "a", &backend, 5000).await?;
    let (b, sb) = instance(&url, "b", &backend, 5000).await?;
    balanced(&[&sa, &sb]).await?;
    let x = a
        .submit(Task::new("fake", json!({"hang": true})))
        .await
        .map_err(|e| e.to_string())?;
    let y = a
        .submit(Task::new("fake", json!({"hang": true})))
        .await
        .map_err(|e| e.to_string())?;
    until(10, "both hanging tasks to push", || async {
        let p = fake.pushes();
        p.iter().any(|(i, _)| *i == x) && p.iter().any(|(i, _)| *i == y)
    })
    .await?;
    let token = fake
        .pushes()
        .into_iter()
        .find(|(i, _)| *i == x)
        .and_then(|(_, n)| n.attributes.get("auth_token").cloned())
        .ok_or("no token")?;
    let finished = Status::Finished(Outcome::Succeeded {
        data: json!("pushed to b"),
    });
    b.notify(x, push(&token, finished, 1_000_000))
        .await
        .map_err(|e| e.to_string())?;
    let rec = a.wait(x).await.map_err(|e| e.to_string())?;
    if rec.state != State::Succeeded {
        return Err(format!("pushed through b, {x} ended {:?}", rec.state));
    }
    b.cancel(y, "through b").await.map_err(|e| e.to_string())?;
    let rec = b.wait(y).await.map_err(|e| e.to_string())?;
    if rec.state != State::Abnormal(distributor_core::AbnormalKind::Cancelled) {
        return Err(format!("cancelled through b, {y} ended {:?}", rec.state));
    }
    // A forged push through the non-owner is refused there, before reaching the database.
    match b
        .notify(x, push("forged", Status::Running, 2_000_000))
        .await
    {
        Err(Error::NotificationRejected(_)) => {}
        other => return Err(format!("forged push: {other:?}")),
    }
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

/// A graceful shutdown gives the shards up at once: the other instance takes them (and their
/// executions) over long before the leases would have expired.
async fn graceful_shutdown_hands_shards_over(url: String) -> Result<(), String> {
    let backend = format!("pg-handover-{}", uuid::Uuid::new_v4());
    let fake = FakeBackend::named(&backend);
    // Leases of 30 s: waiting for an expiry would time the test out.
    let (a, sa) = instance(&url, "a", &backend, 30_000).await?;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(
            a.submit(Task::new("fake", json!({"run_for_ms": 800})))
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let (b, sb) = instance(&url, "b", &backend, 30_000).await?;
    a.shutdown().await;
    drop(a);
    if !held(&sa).is_empty() {
        return Err(format!("a still holds {:?} after shutdown", held(&sa)));
    }
    let t0 = tokio::time::Instant::now();
    for id in &ids {
        let rec = b.wait_task(*id).await.map_err(|e| e.to_string())?;
        if rec.state != State::Succeeded {
            return Err(format!("{id} ended {:?}", rec.state));
        }
    }
    // Rounds run every 10 s with these leases: the hand-over was not waiting for one.
    if t0.elapsed() > Duration::from_secs(8) {
        return Err(format!("the hand-over took {:?}", t0.elapsed()));
    }
    if held(&sb).len() != 8 {
        return Err(format!("b holds {:?}", held(&sb)));
    }
    each_ran_once(&sb, &fake, 10).await?;
    b.shutdown().await;
    Ok(())
}
