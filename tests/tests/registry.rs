//! Every workspace adapter is linked into `distributor-tests` and registered under its
//! directory name (`distributors/<kind>`), so `Registry::from_inventory()` lists it.
//!
//! An adapter crate whose `src/lib.rs` has no `inventory::submit!` yet (still being written) is
//! reported on stderr and not asserted; once it submits, it MUST be registered.

use std::fs;
use std::path::{Path, PathBuf};

use distributor_core::Registry;
use distributor_tests as _;

/// `(kind, crate directory)` for every directory under `distributors/`, sorted.
fn adapter_dirs() -> Vec<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../distributors");
    let mut dirs: Vec<_> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?.to_owned();
            path.join("Cargo.toml").is_file().then_some((name, path))
        })
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no adapter crates under {}",
        root.display()
    );
    dirs
}

fn submits_a_registration(dir: &Path) -> bool {
    fs::read_to_string(dir.join("src/lib.rs")).is_ok_and(|src| src.contains("inventory::submit!"))
}

/// The crate name in `dir/Cargo.toml`, as a Rust identifier (`distributor-local` →
/// `distributor_local`).
fn crate_ident(dir: &Path) -> String {
    let manifest = fs::read_to_string(dir.join("Cargo.toml"))
        .unwrap_or_else(|e| panic!("cannot read {}/Cargo.toml: {e}", dir.display()));
    manifest
        .lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("name")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').replace('-', "_"))
        })
        .unwrap_or_else(|| panic!("no package name in {}/Cargo.toml", dir.display()))
}

#[test]
fn every_adapter_that_submits_a_registration_is_registered_under_its_directory_name() {
    let registry = Registry::from_inventory().expect("no kind is registered twice");
    let known = registry.kind_names();
    let mut checked = 0;
    for (kind, dir) in adapter_dirs() {
        if !submits_a_registration(&dir) {
            eprintln!(
                "note: distributors/{kind} does not register yet (no `inventory::submit!` in \
                 src/lib.rs); not checked"
            );
            continue;
        }
        assert!(
            registry.kind(&kind).is_ok(),
            "distributors/{kind} submits a Registration, but kind `{kind}` is not in \
             Registry::from_inventory() (registered: {known:?}). Is it force-linked from \
             tests/src/lib.rs (`use {} as _;`), and is its KindConfig::KIND \"{kind}\"?",
            crate_ident(&dir)
        );
        checked += 1;
    }
    eprintln!("{checked} adapter(s) checked");
}

#[test]
fn every_adapter_crate_is_force_linked_by_the_tests_crate() {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    let src = fs::read_to_string(&lib).expect("tests/src/lib.rs");
    for (kind, dir) in adapter_dirs() {
        let ident = crate_ident(&dir);
        assert!(
            src.contains(&format!("use {ident} as _;")),
            "distributors/{kind} ({ident}) is not named in tests/src/lib.rs: add \
             `use {ident} as _;` so its registration is linked (rust-lang/rust#64731)"
        );
    }
}

#[test]
fn the_fake_is_not_registered_through_inventory() {
    let registry = Registry::from_inventory().expect("no kind is registered twice");
    assert!(
        registry.kind("fake").is_err(),
        "the testing kit's fake kind must be registered explicitly, never via inventory"
    );
}
