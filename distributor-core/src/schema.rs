//! JSON Schema validation of configs and payloads, with schemas derived from Rust types.
//!
//! Schemas come from `schemars` (draft 2020-12) and are compiled once with `jsonschema`; every
//! violation is reported with its JSON Pointer, what was expected, and a "did you mean" for
//! unknown fields and enum values. `anyOf`/`oneOf` failures (which is what `Option<T>` and enums
//! become) are resolved to the branch that was meant, so the message names the real cause.

use std::sync::Arc;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use schemars::JsonSchema;
use serde_json::Value;

use crate::error::{ValidationError, Violation, nearest};

/// A compiled schema. Cheap to clone; validation allocates only on failure.
#[derive(Clone)]
pub struct SchemaValidator {
    schema: Arc<Value>,
    compiled: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for SchemaValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaValidator").finish_non_exhaustive()
    }
}

impl SchemaValidator {
    /// Derives the schema of `T` and compiles it.
    pub fn of<T: JsonSchema>() -> Self {
        Self::compile(serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Bool(true)))
            .expect("schemars output is a valid schema")
    }

    /// Compiles a schema document.
    pub fn compile(schema: Value) -> Result<Self, String> {
        let compiled = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            schema: Arc::new(schema),
            compiled: Arc::new(compiled),
        })
    }

    /// The schema document.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// True when `value` conforms. The fast path: no allocation.
    pub fn is_valid(&self, value: &Value) -> bool {
        self.compiled.is_valid(value)
    }

    /// Checks `value`, returning every violation. `subject` names the document in the error
    /// (`payload for kind local`).
    pub fn validate(&self, subject: &str, value: &Value) -> Result<(), ValidationError> {
        if self.compiled.is_valid(value) {
            return Ok(());
        }
        let mut violations = Vec::new();
        for e in self.compiled.iter_errors(value) {
            self.collect(&e, &mut violations);
        }
        violations.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        violations.dedup();
        Err(ValidationError {
            subject: subject.to_owned(),
            violations,
        })
    }

    fn collect(&self, e: &jsonschema::ValidationError<'_>, out: &mut Vec<Violation>) {
        let pointer = e.instance_path().as_str().to_owned();
        match e.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected }
            | ValidationErrorKind::UnevaluatedProperties { unexpected } => {
                let known = self.properties_at(&pointer);
                for key in unexpected {
                    out.push(Violation {
                        pointer: format!("{pointer}/{}", escape(key)),
                        expected: match known.is_empty() {
                            true => "no such field".into(),
                            false => format!("one of the fields {}", quoted(&known)),
                        },
                        message: format!("unknown field `{key}`"),
                        suggestion: nearest(key, known.iter().map(String::as_str)),
                    });
                }
            }
            ValidationErrorKind::AnyOf { context }
            | ValidationErrorKind::OneOfNotValid { context } => {
                match best_branch(&pointer, context) {
                    Some(branch) => {
                        for inner in branch {
                            self.collect(inner, out);
                        }
                    }
                    None => {
                        let expected = branch_expectations(context);
                        out.push(Violation {
                            pointer,
                            message: format!("expected {expected}"),
                            expected,
                            suggestion: None,
                        });
                    }
                }
            }
            ValidationErrorKind::Enum { options } => {
                let opts: Vec<String> = options
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let suggestion = e
                    .instance()
                    .as_str()
                    .and_then(|s| nearest(s, opts.iter().map(String::as_str)));
                let expected = format!("one of {}", quoted(&opts));
                out.push(Violation {
                    pointer,
                    message: format!("expected {expected}"),
                    expected,
                    suggestion,
                });
            }
            ValidationErrorKind::Constant { expected_value } => {
                let expected = format!("`{expected_value}`");
                out.push(Violation {
                    pointer,
                    message: format!("expected {expected}"),
                    expected,
                    suggestion: None,
                });
            }
            ValidationErrorKind::Required { property } => {
                let name = property
                    .as_str()
                    .map_or_else(|| property.to_string(), str::to_owned);
                out.push(Violation {
                    pointer: format!("{pointer}/{}", escape(&name)),
                    expected: "a value (this field is required)".into(),
                    message: format!("missing required field `{name}`"),
                    suggestion: None,
                });
            }
            ValidationErrorKind::Type { kind } => {
                let expected = type_words(kind);
                let found = json_type(e.instance());
                out.push(Violation {
                    pointer,
                    message: format!("expected {expected}, found {found}"),
                    expected,
                    suggestion: None,
                });
            }
            _ => {
                let message = e.masked().to_string();
                out.push(Violation {
                    pointer,
                    expected: message.clone(),
                    message,
                    suggestion: None,
                });
            }
        }
    }

    /// The property names the schema allows at the instance location `pointer`.
    fn properties_at(&self, pointer: &str) -> Vec<String> {
        let mut nodes = vec![self.schema.as_ref()];
        for seg in pointer.split('/').skip(1) {
            let seg = unescape(seg);
            let mut next = Vec::new();
            for n in nodes {
                for n in self.expand(n) {
                    if let Some(p) = n.get("properties").and_then(|p| p.get(&seg)) {
                        next.push(p);
                    }
                    if let Some(p) = n.get("additionalProperties").filter(|p| p.is_object()) {
                        next.push(p);
                    }
                    if let Some(p) = n
                        .get("items")
                        .filter(|p| p.is_object() && seg.parse::<usize>().is_ok())
                    {
                        next.push(p);
                    }
                }
            }
            nodes = next;
        }
        let mut names: Vec<String> = nodes
            .into_iter()
            .flat_map(|n| self.expand(n))
            .filter_map(|n| n.get("properties").and_then(Value::as_object))
            .flat_map(|p| p.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// `node` with local `$ref`s resolved and `anyOf`/`oneOf`/`allOf` branches flattened.
    fn expand<'a>(&'a self, node: &'a Value) -> Vec<&'a Value> {
        let mut out = Vec::new();
        let mut stack = vec![node];
        let mut guard = 0;
        while let Some(n) = stack.pop() {
            guard += 1;
            if guard > 256 {
                break;
            }
            let target = n
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix('#'));
            if let Some(target) = target.and_then(|p| self.schema.pointer(p)) {
                stack.push(target);
            }
            for key in ["anyOf", "oneOf", "allOf"] {
                if let Some(branches) = n.get(key).and_then(Value::as_array) {
                    stack.extend(branches.iter());
                }
            }
            out.push(n);
        }
        out
    }
}

/// Picks the `anyOf`/`oneOf` branch the author most plausibly meant: the one that did not fail
/// at the location itself on a type or constant (`null` for an `Option`, a tag for an enum).
fn best_branch<'a>(
    pointer: &str,
    context: &'a [Vec<jsonschema::ValidationError<'static>>],
) -> Option<&'a [jsonschema::ValidationError<'static>]> {
    let shallow_miss = |errs: &[jsonschema::ValidationError<'_>]| {
        errs.iter().any(|e| {
            let at_self = e.instance_path().as_str() == pointer;
            // A discriminator (serde's tag) is a `const`; a field that is merely an enum is not.
            let tag_miss = matches!(e.kind(), ValidationErrorKind::Constant { .. })
                && e.instance_path().as_str().rsplit_once('/').map(|(p, _)| p) == Some(pointer);
            (at_self
                && matches!(
                    e.kind(),
                    ValidationErrorKind::Type { .. } | ValidationErrorKind::Constant { .. }
                ))
                || tag_miss
        })
    };
    let candidates: Vec<_> = context
        .iter()
        .filter(|b| !b.is_empty() && !shallow_miss(b))
        .collect();
    match candidates.as_slice() {
        [] => None,
        [one] => Some(one.as_slice()),
        many => many.iter().min_by_key(|b| b.len()).map(|b| b.as_slice()),
    }
}

fn branch_expectations(context: &[Vec<jsonschema::ValidationError<'static>>]) -> String {
    let mut words: Vec<String> = context
        .iter()
        .flat_map(|b| b.iter())
        .filter_map(|e| match e.kind() {
            ValidationErrorKind::Type { kind } => Some(type_words(kind)),
            ValidationErrorKind::Constant { expected_value } => Some(format!("`{expected_value}`")),
            _ => None,
        })
        .collect();
    words.dedup();
    if words.is_empty() {
        "a value matching one of the allowed forms".into()
    } else {
        words.join(" or ")
    }
}

fn type_words(kind: &TypeKind) -> String {
    let one = |t: &jsonschema::JsonType| match t.to_string().as_str() {
        "object" => "an object".to_owned(),
        "array" => "an array".to_owned(),
        "integer" => "an integer".to_owned(),
        other => format!("a {other}"),
    };
    match kind {
        TypeKind::Single(t) => one(t),
        TypeKind::Multiple(ts) => ts.iter().map(|t| one(&t)).collect::<Vec<_>>().join(" or "),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn escape(seg: &str) -> String {
    seg.replace('~', "~0").replace('/', "~1")
}

fn unescape(seg: &str) -> String {
    seg.replace("~1", "/").replace("~0", "~")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use schemars::JsonSchema;
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limits {
        cpus: u32,
        memory_mb: Option<u64>,
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields, rename_all = "snake_case")]
    #[allow(dead_code)]
    enum Mode {
        Fast,
        Careful,
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
    #[allow(dead_code)]
    enum Source {
        Git { url: String, rev: Option<String> },
        Inline { text: String },
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Payload {
        command: Vec<String>,
        env: Option<BTreeMap<String, String>>,
        limits: Option<Limits>,
        mode: Option<Mode>,
        source: Option<Source>,
        retries: u8,
    }

    fn check(v: serde_json::Value) -> Vec<Violation> {
        SchemaValidator::of::<Payload>()
            .validate("payload", &v)
            .unwrap_err()
            .violations
    }

    #[test]
    fn accepts_a_good_payload() {
        let v = json!({"command": ["true"], "retries": 1, "limits": {"cpus": 2}, "mode": "fast",
                       "source": {"type": "git", "url": "u"}});
        assert_eq!(
            SchemaValidator::of::<Payload>().validate("payload", &v),
            Ok(())
        );
    }

    #[test]
    fn unknown_key_gets_pointer_and_suggestion() {
        let v = check(json!({"comand": ["true"], "retries": 1, "command": []}));
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].pointer, "/comand");
        assert_eq!(v[0].suggestion.as_deref(), Some("command"));
    }

    #[test]
    fn wrong_type_and_missing_field_reported_together() {
        let v = check(json!({"command": "true"}));
        let pointers: Vec<_> = v.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(pointers, ["/command", "/retries"], "{v:?}");
        assert_eq!(v[0].expected, "an array");
        assert!(v[0].message.contains("found a string"));
        assert!(v[1].message.contains("missing required field `retries`"));
    }

    #[test]
    fn option_of_struct_reports_the_nested_cause() {
        let v =
            check(json!({"command": [], "retries": 0, "limits": {"cpus": "two", "memroy_mb": 1}}));
        let pointers: Vec<_> = v.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(pointers, ["/limits/cpus", "/limits/memroy_mb"], "{v:?}");
        assert_eq!(v[1].suggestion.as_deref(), Some("memory_mb"));
        assert!(!v.iter().any(|v| v.message.contains("anyOf")), "{v:?}");
    }

    #[test]
    fn option_of_enum_reports_allowed_values() {
        let v = check(json!({"command": [], "retries": 0, "mode": "fsat"}));
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].pointer, "/mode");
        assert!(v[0].expected.contains("`fast`"), "{v:?}");
        assert_eq!(v[0].suggestion.as_deref(), Some("fast"));
    }

    #[test]
    fn tagged_enum_reports_the_chosen_variant() {
        let v = check(json!({"command": [], "retries": 0, "source": {"type": "git", "rev": "x"}}));
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].pointer, "/source/url");
    }

    #[test]
    fn integer_overflow_is_reported() {
        let v = check(json!({"command": [], "retries": 300}));
        assert_eq!(v[0].pointer, "/retries");
    }

    #[test]
    fn nested_array_items_have_indices() {
        let v = check(json!({"command": ["ok", 3], "retries": 0}));
        assert_eq!(v[0].pointer, "/command/1");
    }
}
