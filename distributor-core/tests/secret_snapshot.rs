//! `Secret` config fields are kept out of execution snapshots (the store), and factory errors
//! name the instance they were building.

use std::sync::Arc;

use distributor_core::reexports::async_trait;
use distributor_core::store::{MemoryStore, Store};
use distributor_core::testing::FakeConfig;
use distributor_core::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A kind whose config carries a credential; it builds a fake once the credential checks out.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct VaultConfig {
    /// The credential.
    token: Secret,
    /// The fake backend behind it.
    backend: String,
}

#[async_trait]
impl KindConfig for VaultConfig {
    const KIND: &'static str = "vault";
    type Payload = <FakeConfig as KindConfig>::Payload;

    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        if self.token.resolve()? != "let-me-in" {
            return Err(Error::permanent("the token is refused"));
        }
        FakeConfig {
            backend: self.backend,
            ..FakeConfig::default()
        }
        .build(ctx)
        .await
    }
}

fn registry() -> Registry {
    Registry::new().register::<VaultConfig>().unwrap()
}

fn config(token: serde_json::Value) -> DistributorsConfig {
    let doc = json!({"distributors": {"v": {"kind": "vault", "token": token, "backend": "secret-snapshot"}}});
    DistributorsConfig::from_value(&registry(), "test", &doc).unwrap()
}

#[tokio::test]
async fn a_literal_secret_never_reaches_the_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let engine = Engine::builder()
        .registry(registry())
        .distributors(config(json!("let-me-in")))
        .store_arc(store.clone())
        .build()
        .await
        .unwrap();
    let id = engine
        .submit(Task::new("v", json!({"run_for_ms": 1})))
        .await
        .unwrap();
    let rec = engine.wait(id).await.unwrap();
    assert_eq!(
        *rec.config,
        json!({"token": {"redacted": true}, "backend": "secret-snapshot"})
    );
    let stored = store.get(id).await.unwrap();
    let text = serde_json::to_string(&stored).unwrap();
    assert!(
        !text.contains("let-me-in"),
        "the store holds the secret: {text}"
    );
    assert!(
        !format!("{:?}", engine.instance("v").unwrap()).contains("let-me-in"),
        "Debug of the instance shows the secret"
    );
    engine.shutdown().await;
}

#[tokio::test]
async fn env_and_file_secrets_are_kept_by_reference_and_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "let-me-in\n").unwrap();
    let cfg = config(json!({"file": path}));
    let instances = registry()
        .build_all(&cfg, |_| DeferredQueue::detached(), &Notifier::detached())
        .await
        .unwrap();
    let snapshot = instances[&DistributorName::new("v")].config().clone();
    assert_eq!(snapshot["token"], json!({"file": path}));
    // The snapshot alone rebuilds the instance (what recovery does after a config change).
    let kind = registry().kind("vault").unwrap().clone();
    kind.build(
        snapshot,
        BuildContext::detached("v"),
        ConfigHash::of("vault", &json!({})),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_redacted_literal_cannot_rebuild_and_says_why() {
    let kind = registry().kind("vault").unwrap().clone();
    let err = kind
        .build(
            json!({"token": {"redacted": true}, "backend": "secret-snapshot"}),
            BuildContext::detached("old"),
            ConfigHash::of("vault", &json!({})),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(!err.is_transient());
    assert!(
        text.starts_with("distributor `old` (kind `vault`): "),
        "{text}"
    );
    assert!(text.contains("redacted") && text.contains("env"), "{text}");
}

#[tokio::test]
async fn factory_errors_name_the_instance_and_kind() {
    let err = registry()
        .build_all(
            &config(json!("wrong")),
            |_| DeferredQueue::detached(),
            &Notifier::detached(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "distributor `v` (kind `vault`): the token is refused"
    );
    let err = registry()
        .build_all(
            &config(json!({"env": "DISTRIBUTOR_TEST_NO_SUCH_VARIABLE"})),
            |_| DeferredQueue::detached(),
            &Notifier::detached(),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("distributor `v` (kind `vault`): secret from environment variable `DISTRIBUTOR_TEST_NO_SUCH_VARIABLE`"),
        "{text}"
    );
}

#[test]
fn kind_snapshot_redacts_a_nested_config() {
    let kind = registry().kind("vault").unwrap().clone();
    let snap = kind
        .snapshot(&json!({"token": "let-me-in", "backend": "b"}))
        .unwrap();
    assert_eq!(snap, json!({"token": {"redacted": true}, "backend": "b"}));
    let err = kind.snapshot(&json!({"token": 5})).unwrap_err();
    assert!(err.to_string().contains("config of kind `vault`"), "{err}");
}
