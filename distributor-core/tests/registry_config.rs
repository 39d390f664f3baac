//! Registry and distributors-config behaviour: duplicate and unknown kinds, aliases, config
//! errors with pointers (all at once), formats and hashes.

use distributor_core::testing::FakeConfig;
use distributor_core::*;
use serde_json::json;

fn registry() -> Registry {
    Registry::new().register::<FakeConfig>().unwrap()
}

fn problems(err: Error) -> Vec<(Option<String>, String, String)> {
    let Error::Config(c) = err else {
        panic!("expected a config error, got {err}")
    };
    c.problems
        .into_iter()
        .map(|p| (p.instance.map(|i| i.to_string()), p.pointer, p.message))
        .collect()
}

#[test]
fn duplicate_kind_is_an_error_not_a_panic() {
    let err = registry().register::<FakeConfig>().unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateKind(k) if k.as_str() == "fake"),
        "{err}"
    );
    assert_eq!(err.to_string(), "kind `fake` is registered twice");
}

#[test]
fn unknown_kind_lists_known_kinds_and_suggests_the_nearest() {
    let err = registry().kind("fkae").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown kind `fkae` (did you mean `fake`?); known kinds: `fake`"
    );
    let doc = json!({"distributors": {"a": {"kind": "fkae"}}});
    let p = problems(DistributorsConfig::from_value(&registry(), "d.toml", &doc).unwrap_err());
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1, "/kind");
    assert!(p[0].2.contains("did you mean `fake`"), "{p:?}");
}

#[test]
fn every_config_error_is_reported_at_once_with_instance_and_pointer() {
    let doc = json!({"distributors": {
        "one": {"kind": "fake", "backend": 7, "pushh": true},
        "two": {"kind": "fake", "poll_interval_ms": -1},
        "ok": {"kind": "fake"},
    }});
    let err = DistributorsConfig::from_value(&registry(), "d.toml", &doc).unwrap_err();
    let text = err.to_string();
    let p = problems(err);
    let at: Vec<(&str, &str)> = p
        .iter()
        .map(|(i, ptr, _)| (i.as_deref().unwrap(), ptr.as_str()))
        .collect();
    assert_eq!(
        at,
        [
            ("one", "/backend"),
            ("one", "/pushh"),
            ("two", "/poll_interval_ms")
        ],
        "{text}"
    );
    assert!(text.starts_with("d.toml: 3 problems"), "{text}");
    assert!(text.contains("did you mean `push`"), "{text}");
}

#[test]
fn aliases_are_one_level_and_must_name_real_instances() {
    let reg = registry();
    let doc = json!({"distributors": {
        "real": {"kind": "fake"},
        "self": {"alias": "self"},
        "a": {"alias": "b"},
        "b": {"alias": "a"},
        "chain": {"alias": "good"},
        "good": {"alias": "real"},
        "dangling": {"alias": "reel"},
        "both": {"alias": "real", "kind": "fake"},
        "extra": {"alias": "real", "backend": "x"},
    }});
    let p = problems(DistributorsConfig::from_value(&reg, "d.toml", &doc).unwrap_err());
    let find = |name: &str| {
        p.iter()
            .find(|(i, _, _)| i.as_deref() == Some(name))
            .map(|(_, _, m)| m.clone())
            .unwrap_or_default()
    };
    assert!(find("self").contains("cycle"), "{p:?}");
    assert!(
        find("a").contains("cycle") && find("b").contains("cycle"),
        "{p:?}"
    );
    assert!(find("chain").contains("one level"), "{p:?}");
    assert!(
        find("dangling").contains("unknown distributor `reel` (did you mean `real`?)"),
        "{p:?}"
    );
    assert!(find("both").contains("both `kind` and `alias`"), "{p:?}");
    assert!(find("extra").contains("no other fields"), "{p:?}");
    assert!(find("good").is_empty() && find("real").is_empty(), "{p:?}");
}

#[test]
fn toml_and_json_give_the_same_instances_and_hashes() {
    let reg = registry();
    let toml = r#"
        [distributors.fast]
        kind = "fake"
        backend = "b1"
        poll_interval_ms = 100

        [distributors.slow]
        kind = "fake"
        backend = "b2"
        push = false

        [distributors.default]
        alias = "fast"
    "#;
    let json = r#"{"distributors": {
        "slow": {"push": false, "backend": "b2", "kind": "fake"},
        "fast": {"poll_interval_ms": 100, "kind": "fake", "backend": "b1"},
        "default": {"alias": "fast"}}}"#;
    let a = DistributorsConfig::from_toml_str(&reg, "d.toml", toml).unwrap();
    let b = DistributorsConfig::from_json_str(&reg, "d.json", json).unwrap();
    assert_eq!(a, b);
    let names: Vec<String> = a.names().iter().map(|n| n.to_string()).collect();
    assert_eq!(names, ["default", "fast", "slow"]);
    let (name, inst) = a.resolve("default").unwrap();
    assert_eq!(name.as_str(), "fast");
    assert_eq!(
        inst.hash,
        ConfigHash::of("fake", &json!({"backend": "b1", "poll_interval_ms": 100}))
    );
    assert_ne!(a.resolve("slow").unwrap().1.hash, inst.hash);
}

#[test]
fn files_are_loaded_by_extension_and_bad_syntax_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.json");
    std::fs::write(&path, r#"{"distributors": {"x": {"kind": "fake"}}}"#).unwrap();
    assert!(DistributorsConfig::load(&registry(), &path).is_ok());
    let path = dir.path().join("d.toml");
    std::fs::write(&path, "[distributors.x\nkind = 1").unwrap();
    let err = DistributorsConfig::load(&registry(), &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid TOML"), "{err}");
    let err = DistributorsConfig::from_value(&registry(), "d", &json!({"other": 1}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no `distributors` table"), "{err}");
}

#[tokio::test]
async fn instances_validate_payloads_with_pointers_then_build() {
    let reg = registry();
    let cfg = DistributorsConfig::from_value(
        &reg,
        "d",
        &json!({"distributors": {"f": {"kind": "fake"}}}),
    )
    .unwrap();
    let built = reg
        .build_all(&cfg, |_| DeferredQueue::detached(), &Notifier::detached())
        .await
        .unwrap();
    let inst = &built[&DistributorName::new("f")];
    assert_eq!(inst.kind().name().as_str(), "fake");
    let err = inst
        .validate(
            &json!({"run_for_ms": true, "outcome": {"outcome": "abnormal", "kind": "exploded"}}),
        )
        .unwrap_err();
    let pointers: Vec<_> = err.violations.iter().map(|v| v.pointer.as_str()).collect();
    assert_eq!(pointers, ["/outcome/kind", "/run_for_ms"], "{err}");
    assert!(inst.validate(&json!({"run_for_ms": 5})).is_ok());
}
