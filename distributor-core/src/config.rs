//! Distributors config: named instances of kinds, loaded from TOML or JSON.
//!
//! ```toml
//! [distributors.hpc]           # an instance of kind `slurm`
//! kind = "slurm"
//! url = "http://127.0.0.1:6820"
//!
//! [distributors.default]       # an alias: one level, no cycles, must name a real instance
//! alias = "hpc"
//! ```
//!
//! Every instance is validated against its kind's config schema at load, before any factory
//! runs, and every problem in the file is reported at once (instance, JSON Pointer, message).
//! Other top-level tables are left to the embedder. Each instance gets a stable content hash,
//! stored with every execution as its config snapshot.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ConfigError, ConfigProblem, Error, nearest};
use crate::registry::Registry;
use crate::types::{DistributorName, KindName};

/// SHA-256 of an instance's kind and canonical config JSON, hex-encoded. Stable across key order
/// and file format (TOML or JSON). Clones share one string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConfigHash(std::sync::Arc<str>);

impl ConfigHash {
    /// The hash of `kind` + `config`.
    pub fn of(kind: &str, config: &Value) -> Self {
        let mut h = Sha256::new();
        h.update(kind.as_bytes());
        h.update([0]);
        h.update(canonical(config).as_bytes());
        Self(hex::encode(h.finalize()).into())
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            let body: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&m[k])))
                .collect();
            format!("{{{}}}", body.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// One configured instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceConfig {
    /// Its kind.
    pub kind: KindName,
    /// Its config, without the `kind` field.
    pub config: Value,
    /// Content hash of kind + config.
    pub hash: ConfigHash,
}

/// A validated distributors config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DistributorsConfig {
    instances: BTreeMap<DistributorName, InstanceConfig>,
    aliases: BTreeMap<DistributorName, DistributorName>,
}

impl DistributorsConfig {
    /// Loads a file; the format follows the extension (`.json`, otherwise TOML).
    pub fn load(registry: &Registry, path: &Path) -> Result<Self, Error> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| file_problem(&name, format!("cannot read: {e}")))?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::from_json_str(registry, &name, &text),
            _ => Self::from_toml_str(registry, &name, &text),
        }
    }

    /// Parses and validates a TOML document. `source_name` names it in errors.
    pub fn from_toml_str(
        registry: &Registry,
        source_name: &str,
        text: &str,
    ) -> Result<Self, Error> {
        let doc: Value = toml::from_str(text)
            .map_err(|e| file_problem(source_name, format!("invalid TOML: {e}")))?;
        Self::from_value(registry, source_name, &doc)
    }

    /// Parses and validates a JSON document.
    pub fn from_json_str(
        registry: &Registry,
        source_name: &str,
        text: &str,
    ) -> Result<Self, Error> {
        let doc: Value = serde_json::from_str(text)
            .map_err(|e| file_problem(source_name, format!("invalid JSON: {e}")))?;
        Self::from_value(registry, source_name, &doc)
    }

    /// Validates a parsed document with a top-level `distributors` table.
    pub fn from_value(registry: &Registry, source_name: &str, doc: &Value) -> Result<Self, Error> {
        let mut problems = Vec::new();
        let mut problem = |instance: Option<&str>, pointer: String, message: String| {
            problems.push(ConfigProblem {
                instance: instance.map(DistributorName::from),
                pointer,
                message,
            });
        };
        let Some(table) = doc.get("distributors") else {
            return Err(file_problem(source_name, "no `distributors` table".into()));
        };
        let Some(table) = table.as_object() else {
            return Err(file_problem(
                source_name,
                "`distributors` must be a table of named instances".into(),
            ));
        };
        let mut out = Self::default();
        let mut raw_aliases = BTreeMap::new();
        for (name, entry) in table {
            let Some(fields) = entry.as_object() else {
                problem(
                    Some(name),
                    String::new(),
                    "expected a table with `kind` or `alias`".into(),
                );
                continue;
            };
            match (fields.get("kind"), fields.get("alias")) {
                (Some(_), Some(_)) => problem(
                    Some(name),
                    String::new(),
                    "has both `kind` and `alias`".into(),
                ),
                (None, None) => problem(
                    Some(name),
                    String::new(),
                    "needs `kind` (an instance) or `alias` (another name)".into(),
                ),
                (None, Some(target)) => match (target.as_str(), fields.len()) {
                    (Some(t), 1) => {
                        raw_aliases.insert(name.clone(), t.to_owned());
                    }
                    (None, _) => problem(
                        Some(name),
                        "/alias".into(),
                        "expected a string naming another distributor".into(),
                    ),
                    (Some(_), _) => problem(
                        Some(name),
                        String::new(),
                        "an alias has no other fields".into(),
                    ),
                },
                (Some(kind), None) => {
                    let Some(kind) = kind.as_str() else {
                        problem(Some(name), "/kind".into(), "expected a string".into());
                        continue;
                    };
                    let k = match registry.kind(kind) {
                        Ok(k) => k,
                        Err(e) => {
                            problem(Some(name), "/kind".into(), e.to_string());
                            continue;
                        }
                    };
                    let mut config = fields.clone();
                    config.remove("kind");
                    let config = Value::Object(config);
                    if let Err(v) = k.validate_config_in(registry, name, &config) {
                        for v in v.violations {
                            problem(
                                Some(name),
                                v.pointer.clone(),
                                v.to_string()
                                    .split_once(": ")
                                    .map_or(v.message.clone(), |(_, m)| m.to_owned()),
                            );
                        }
                        continue;
                    }
                    let hash = ConfigHash::of(kind, &config);
                    out.instances.insert(
                        DistributorName::from(name.as_str()),
                        InstanceConfig {
                            kind: KindName::new(kind),
                            config,
                            hash,
                        },
                    );
                }
            }
        }
        for (alias, target) in &raw_aliases {
            if raw_aliases.contains_key(target) {
                let msg = if target == alias || raw_aliases.get(target) == Some(alias) {
                    format!("alias cycle: `{alias}` → `{target}` → …")
                } else {
                    format!("`{target}` is itself an alias; aliases are one level deep")
                };
                problem(Some(alias), "/alias".into(), msg);
            } else if table.get(target).is_none() {
                let suggestion = nearest(target, table.keys().map(String::as_str))
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                problem(
                    Some(alias),
                    "/alias".into(),
                    format!("names unknown distributor `{target}`{suggestion}"),
                );
            } else if out
                .instances
                .contains_key(&DistributorName::from(target.as_str()))
            {
                out.aliases
                    .insert(alias.as_str().into(), target.as_str().into());
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(ConfigError {
                source_name: source_name.to_owned(),
                problems,
            }
            .into())
        }
    }

    /// The real instances (not aliases).
    pub fn instances(&self) -> impl Iterator<Item = (&DistributorName, &InstanceConfig)> {
        self.instances.iter()
    }

    /// Aliases and their targets.
    pub fn aliases(&self) -> impl Iterator<Item = (&DistributorName, &DistributorName)> {
        self.aliases.iter()
    }

    /// The instance a name refers to, following one alias.
    pub fn resolve(&self, name: &str) -> Option<(&DistributorName, &InstanceConfig)> {
        let name = DistributorName::from(name);
        let target = self.aliases.get(&name).unwrap_or(&name);
        self.instances.get_key_value(target)
    }

    /// Every usable name: instances and aliases.
    pub fn names(&self) -> Vec<DistributorName> {
        let mut v: Vec<_> = self
            .instances
            .keys()
            .chain(self.aliases.keys())
            .cloned()
            .collect();
        v.sort();
        v
    }
}

fn file_problem(source_name: &str, message: String) -> Error {
    ConfigError {
        source_name: source_name.to_owned(),
        problems: vec![ConfigProblem {
            instance: None,
            pointer: String::new(),
            message,
        }],
    }
    .into()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn hash_ignores_key_order_and_format() {
        let a = ConfigHash::of("local", &json!({"a": 1, "b": {"x": [1, 2], "y": "z"}}));
        let b = ConfigHash::of("local", &json!({"b": {"y": "z", "x": [1, 2]}, "a": 1}));
        assert_eq!(a, b);
        assert_ne!(
            a,
            ConfigHash::of("slurm", &json!({"a": 1, "b": {"x": [1, 2], "y": "z"}}))
        );
        assert_ne!(
            a,
            ConfigHash::of("local", &json!({"a": 2, "b": {"x": [1, 2], "y": "z"}}))
        );
    }
}
