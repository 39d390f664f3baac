//! [`Secret`]: a config field holding a credential, kept out of execution snapshots and logs.
//!
//! Every execution stores a snapshot of its distributor's config (the engine rebuilds the
//! instance from it after a restart or a reload). A bearer token written into that config would
//! end up in the database of every execution. A field of type [`Secret`] avoids it:
//!
//! - in a config document it is the secret itself (`"s3cr3t"` or `{"value": "s3cr3t"}`, for
//!   tests), or where to read it at build time: `{"env": "NAME"}` (an environment variable of
//!   the orchestrator process) or `{"file": "/run/secrets/name"}` (a file, e.g. a Kubernetes or
//!   systemd credential; one trailing newline is dropped);
//! - serialized (which is how the snapshot is written: the engine stores the config *as
//!   deserialized into the kind's type and serialized again*) `env` and `file` are kept, since
//!   they name where the secret is, not what it is, and a literal becomes
//!   `{"redacted": true}`;
//! - `Debug` never shows a literal;
//! - the adapter reads it with [`Secret::resolve`] in its factory (or again later, e.g. on
//!   HTTP 401, to pick up a rotated file).
//!
//! An instance rebuilt from a snapshot whose literal was redacted cannot get the secret back:
//! [`Secret::resolve`] then fails with a permanent error that says so. The engine rebuilds
//! from a snapshot only when the live config no longer has the snapshot's hash (the config was
//! changed while executions were in flight), so literals work until the config changes; give
//! secrets by `env` or `file` in production.
//!
//! The JSON Schema of a `Secret` is an `anyOf` of the four forms and carries `"writeOnly": true`,
//! the JSON Schema annotation for "never returned", so tools reading a kind's schema can tell
//! which fields are secret.
//!
//! ```
//! use distributor_core::Secret;
//! use serde_json::json;
//!
//! let s: Secret = serde_json::from_value(json!("t0ken")).unwrap();
//! assert_eq!(s.resolve().unwrap(), "t0ken");
//! assert_eq!(serde_json::to_value(&s).unwrap(), json!({"redacted": true}));
//! assert_eq!(format!("{s:?}"), "Secret::Value(<redacted>)");
//!
//! let s: Secret = serde_json::from_value(json!({"env": "NO_SUCH_VAR_DISTRIBUTOR"})).unwrap();
//! assert_eq!(serde_json::to_value(&s).unwrap(), json!({"env": "NO_SUCH_VAR_DISTRIBUTOR"}));
//! assert!(s.resolve().unwrap_err().to_string().contains("NO_SUCH_VAR_DISTRIBUTOR"));
//! ```

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// A secret config value: given literally, or read from an environment variable or a file when
/// the adapter [resolves](Self::resolve) it. Serializes without the literal (see the
/// [module docs](self)).
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The secret itself (`"…"` or `{"value": "…"}`). Meant for tests: it is in the config
    /// file, and it is redacted from execution snapshots.
    Value(String),
    /// The name of an environment variable of the orchestrator process holding it.
    Env(String),
    /// A file holding it (one trailing `\n` or `\r\n` is dropped). Read at every
    /// [`resolve`](Self::resolve), so it can be rotated.
    File(PathBuf),
    /// A literal that was removed when the config was serialized (a snapshot); it cannot be
    /// resolved.
    Redacted,
}

impl Secret {
    /// Reads the secret.
    ///
    /// Errors (all permanent: the config cannot work as it stands): the environment variable
    /// is not set or not UTF-8, the file cannot be read or is not UTF-8, the secret is empty,
    /// or it was [redacted](Self::Redacted). Messages name the variable or the file, never the
    /// value.
    pub fn resolve(&self) -> Result<String> {
        let value = match self {
            Self::Value(v) => v.clone(),
            Self::Env(name) => std::env::var(name).map_err(|e| {
                Error::permanent_from(format!("secret from environment variable `{name}`"), e)
            })?,
            Self::File(path) => {
                let mut s = std::fs::read_to_string(path).map_err(|e| {
                    Error::permanent_from(format!("secret from file `{}`", path.display()), e)
                })?;
                if s.ends_with('\n') {
                    s.pop();
                    if s.ends_with('\r') {
                        s.pop();
                    }
                }
                s
            }
            Self::Redacted => {
                return Err(Error::permanent(
                    "the secret was given literally and redacted from the stored config \
                     snapshot, so an instance rebuilt from the snapshot cannot read it; give it \
                     as {\"env\": …} or {\"file\": …}",
                ));
            }
        };
        if value.is_empty() {
            return Err(Error::permanent(format!("{} is empty", self.describe())));
        }
        Ok(value)
    }

    /// Where the secret comes from, for messages (`environment variable `X``, never the value).
    pub fn describe(&self) -> String {
        match self {
            Self::Value(_) => "the secret given in the config".into(),
            Self::Env(n) => format!("the secret in environment variable `{n}`"),
            Self::File(p) => format!("the secret in file `{}`", p.display()),
            Self::Redacted => "a redacted secret".into(),
        }
    }
}

impl From<String> for Secret {
    /// A literal secret (tests and tools that build configs in code).
    fn from(value: String) -> Self {
        Self::Value(value)
    }
}

impl From<&str> for Secret {
    /// A literal secret (tests and tools that build configs in code).
    fn from(value: &str) -> Self {
        Self::Value(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("Secret::Value(<redacted>)"),
            Self::Env(n) => write!(f, "Secret::Env({n:?})"),
            Self::File(p) => write!(f, "Secret::File({p:?})"),
            Self::Redacted => f.write_str("Secret::Redacted"),
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        match self {
            Self::Value(_) | Self::Redacted => m.serialize_entry("redacted", &true)?,
            Self::Env(n) => m.serialize_entry("env", n)?,
            Self::File(p) => m.serialize_entry("file", p)?,
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(SecretVisitor)
    }
}

struct SecretVisitor;

const FORMS: &[&str] = &["value", "env", "file"];

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a secret: a string, or an object with exactly one of `value`, `env`, `file`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Secret, E> {
        Ok(Secret::Value(v.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Secret, A::Error> {
        let Some(key) = map.next_key::<String>()? else {
            return Err(de::Error::custom(
                "a secret object needs one of `value`, `env`, `file`",
            ));
        };
        let secret = match key.as_str() {
            "value" => Secret::Value(map.next_value()?),
            "env" => Secret::Env(map.next_value()?),
            "file" => Secret::File(map.next_value()?),
            "redacted" => {
                let _: bool = map.next_value()?;
                Secret::Redacted
            }
            other => return Err(de::Error::unknown_field(other, FORMS)),
        };
        if let Some(extra) = map.next_key::<String>()? {
            return Err(de::Error::custom(format!(
                "a secret object has exactly one key; `{key}` and `{extra}` given"
            )));
        }
        Ok(secret)
    }
}

impl JsonSchema for Secret {
    fn schema_name() -> Cow<'static, str> {
        "Secret".into()
    }

    fn schema_id() -> Cow<'static, str> {
        "distributor_core::Secret".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let one = |key: &str, what: &str| {
            json_schema!({
                "type": "object",
                "properties": { key: { "type": "string", "minLength": 1, "description": what } },
                "required": [key],
                "additionalProperties": false,
            })
        };
        json_schema!({
            "description": "A secret: the value itself (tests only; redacted from execution \
                snapshots), {\"env\": NAME} to read an environment variable, or {\"file\": PATH} \
                to read a file when the distributor is built.",
            "writeOnly": true,
            "anyOf": [
                { "type": "string", "minLength": 1, "description": "the secret itself" },
                one("value", "the secret itself"),
                one("env", "an environment variable of the orchestrator holding the secret"),
                one("file", "a file holding the secret (one trailing newline is dropped)"),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::SchemaValidator;

    fn parse(v: serde_json::Value) -> std::result::Result<Secret, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn every_form_parses_and_literals_serialize_redacted() {
        assert_eq!(parse(json!("a")).unwrap(), Secret::Value("a".into()));
        assert_eq!(
            parse(json!({"value": "a"})).unwrap(),
            Secret::Value("a".into())
        );
        assert_eq!(parse(json!({"env": "E"})).unwrap(), Secret::Env("E".into()));
        assert_eq!(
            parse(json!({"file": "/f"})).unwrap(),
            Secret::File("/f".into())
        );
        let redacted = serde_json::to_value(Secret::Value("a".into())).unwrap();
        assert_eq!(redacted, json!({"redacted": true}));
        assert_eq!(parse(redacted).unwrap(), Secret::Redacted);
        for s in [Secret::Env("E".into()), Secret::File("/f".into())] {
            assert_eq!(parse(serde_json::to_value(&s).unwrap()).unwrap(), s);
        }
    }

    #[test]
    fn bad_forms_are_refused_by_name() {
        let e = parse(json!({"envv": "E"})).unwrap_err().to_string();
        assert!(e.contains("envv") && e.contains("env"), "{e}");
        let e = parse(json!({"env": "E", "file": "/f"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one key"), "{e}");
        assert!(parse(json!({})).is_err());
        assert!(parse(json!(7)).is_err());
    }

    #[test]
    fn resolve_reads_env_and_file_and_never_prints_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\r\n").unwrap();
        assert_eq!(Secret::File(path.clone()).resolve().unwrap(), "from-file");
        std::fs::write(&path, "").unwrap();
        let e = Secret::File(path.clone()).resolve().unwrap_err();
        assert!(
            !e.is_transient() && e.to_string().contains("is empty"),
            "{e}"
        );
        let e = Secret::File(dir.path().join("absent"))
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
        // PATH is set in every test environment.
        assert!(!Secret::Env("PATH".into()).resolve().unwrap().is_empty());
        let e = Secret::Env("DISTRIBUTOR_NO_SUCH_VARIABLE".into())
            .resolve()
            .unwrap_err();
        assert!(
            e.to_string().contains("DISTRIBUTOR_NO_SUCH_VARIABLE"),
            "{e}"
        );
        let e = Secret::Redacted.resolve().unwrap_err();
        assert!(e.to_string().contains("redacted"), "{e}");
        assert_eq!(
            format!("{:?}", Secret::Value("hunter2".into())),
            "Secret::Value(<redacted>)"
        );
    }

    #[derive(serde::Deserialize, JsonSchema)]
    #[allow(dead_code)]
    struct Holder {
        token: Secret,
    }

    #[test]
    fn the_schema_accepts_the_four_forms_and_names_the_field() {
        let v = SchemaValidator::of::<Holder>();
        for ok in [
            json!({"token": "t"}),
            json!({"token": {"value": "t"}}),
            json!({"token": {"env": "T"}}),
            json!({"token": {"file": "/t"}}),
        ] {
            v.validate("holder", &ok).unwrap();
        }
        for bad in [
            json!({"token": 5}),
            json!({"token": {"env": "T", "file": "/t"}}),
            json!({"token": ""}),
            json!({"token": {"redacted": true}}),
        ] {
            let e = v.validate("holder", &bad).unwrap_err();
            assert!(
                e.violations.iter().any(|x| x.pointer.starts_with("/token")),
                "{bad}: {e}"
            );
        }
        let schema = serde_json::to_value(schemars::schema_for!(Holder)).unwrap();
        assert!(schema.to_string().contains("writeOnly"), "{schema}");
    }
}
