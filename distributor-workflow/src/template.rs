//! `{{ … }}` references in payloads: what they name, and rendering them against a run.
//!
//! A string that is exactly one `{{ expr }}` (spaces allowed) becomes the referenced JSON value;
//! in any other string each reference is replaced by its text (strings as they are, other values
//! as compact JSON). Expressions are dotted paths: `params.<name>…`, `steps.<name>.result…`,
//! `steps.<name>.state`, `item…`, `run.id`, `run.name`; a numeric segment indexes an array.

use std::collections::BTreeMap;

use serde_json::Value;

/// What one `{{ … }}` refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// `params.<name>…`
    Param(String),
    /// `steps.<name>.result…` or `steps.<name>.state`
    Step(String),
    /// `item…` (the current fan-out item)
    Item,
    /// `run.id`, `run.name`
    Run,
    /// Not a valid reference; the message says why.
    Invalid(String),
}

fn parse(expr: &str) -> (Reference, Vec<&str>) {
    let parts: Vec<&str> = expr.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return (
            Reference::Invalid(format!("`{expr}` is not a dotted path")),
            vec![],
        );
    }
    match parts.as_slice() {
        ["params", name, rest @ ..] => (Reference::Param((*name).to_owned()), rest.to_vec()),
        ["steps", name, "result", rest @ ..] => {
            (Reference::Step((*name).to_owned()), rest.to_vec())
        }
        ["steps", name, "state"] => (Reference::Step((*name).to_owned()), vec![]),
        ["steps", ..] => (
            Reference::Invalid(format!(
                "`{expr}`: expected steps.<name>.result[.field…] or steps.<name>.state"
            )),
            vec![],
        ),
        ["item", rest @ ..] => (Reference::Item, rest.to_vec()),
        ["run", "id" | "name"] => (Reference::Run, vec![]),
        _ => (
            Reference::Invalid(format!(
                "`{expr}`: expected params.…, steps.<name>.result…, steps.<name>.state, item…, run.id or run.name"
            )),
            vec![],
        ),
    }
}

/// The `{{ … }}` expressions in `s`, with an error text for an unclosed one.
fn exprs(s: &str) -> Vec<Result<(std::ops::Range<usize>, &str), String>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(open) = s[at..].find("{{") {
        let start = at + open;
        match s[start + 2..].find("}}") {
            Some(close) => {
                let end = start + 2 + close + 2;
                out.push(Ok((start..end, s[start + 2..end - 2].trim())));
                at = end;
            }
            None => {
                out.push(Err(format!("unclosed `{{{{` in `{s}`")));
                break;
            }
        }
    }
    out
}

/// The expression of a value that is one string made of exactly one `{{ … }}`.
pub fn whole(v: &Value) -> Option<&str> {
    let s = v.as_str()?;
    let e = exprs(s);
    match e.as_slice() {
        [Ok((r, expr))] if r.start == 0 && r.end == s.len() => Some(expr),
        _ => None,
    }
}

/// Collects every reference in `v` with the JSON Pointer of the string holding it.
pub fn references(v: &Value, pointer: &str, out: &mut Vec<(String, Reference)>) {
    match v {
        Value::String(s) => {
            for e in exprs(s) {
                match e {
                    Ok((_, expr)) => out.push((pointer.to_owned(), parse(expr).0)),
                    Err(m) => out.push((pointer.to_owned(), Reference::Invalid(m))),
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                references(x, &format!("{pointer}/{i}"), out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                let k = k.replace('~', "~0").replace('/', "~1");
                references(x, &format!("{pointer}/{k}"), out);
            }
        }
        _ => {}
    }
}

/// What a step looks like to templates of the steps after it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepValue {
    /// How it ended (`succeeded`, `failed`…).
    pub state: String,
    /// Its result data (`null` when it did not succeed).
    pub result: Value,
}

/// Everything a template can see.
#[derive(Debug, Clone, Default)]
pub struct Scope<'a> {
    /// Resolved run parameters.
    pub params: Option<&'a BTreeMap<String, Value>>,
    /// Finished steps.
    pub steps: BTreeMap<&'a str, StepValue>,
    /// The fan-out item.
    pub item: Option<&'a Value>,
    /// The run id.
    pub run_id: &'a str,
    /// The workflow name.
    pub run_name: &'a str,
}

fn walk(mut v: &Value, path: &[&str], expr: &str) -> Result<Value, String> {
    for seg in path {
        v = match v {
            Value::Object(o) => o.get(*seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| format!("`{expr}`: no `{seg}` in {}", short(v)))?;
    }
    Ok(v.clone())
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", &s[..s.floor_char_boundary(80)])
    } else {
        s
    }
}

impl Scope<'_> {
    fn eval(&self, expr: &str) -> Result<Value, String> {
        let (r, path) = parse(expr);
        match r {
            Reference::Invalid(m) => Err(m),
            Reference::Param(p) => {
                let v = self
                    .params
                    .and_then(|m| m.get(&p))
                    .ok_or_else(|| format!("`{expr}`: no parameter `{p}`"))?;
                walk(v, &path, expr)
            }
            Reference::Step(s) => {
                let st = self
                    .steps
                    .get(s.as_str())
                    .ok_or_else(|| format!("`{expr}`: step `{s}` has not finished"))?;
                if expr.ends_with(".state") && path.is_empty() {
                    Ok(Value::String(st.state.clone()))
                } else {
                    walk(&st.result, &path, expr)
                }
            }
            Reference::Item => {
                let v = self
                    .item
                    .ok_or_else(|| format!("`{expr}`: not in a for_each step"))?;
                walk(v, &path, expr)
            }
            Reference::Run => Ok(Value::String(if expr == "run.id" {
                self.run_id.to_owned()
            } else {
                self.run_name.to_owned()
            })),
        }
    }

    /// Renders every `{{ … }}` in `v`. Errors name the JSON Pointer (under `pointer`) of the
    /// string that could not be rendered.
    pub fn render(&self, v: &Value, pointer: &str) -> Result<Value, (String, String)> {
        Ok(match v {
            Value::String(s) => {
                if let Some(expr) = whole(v) {
                    return self.eval(expr).map_err(|m| (pointer.to_owned(), m));
                }
                let mut out = String::with_capacity(s.len());
                let mut last = 0;
                for e in exprs(s) {
                    let (range, expr) = e.map_err(|m| (pointer.to_owned(), m))?;
                    out.push_str(&s[last..range.start]);
                    match self.eval(expr).map_err(|m| (pointer.to_owned(), m))? {
                        Value::String(t) => out.push_str(&t),
                        other => out.push_str(&other.to_string()),
                    }
                    last = range.end;
                }
                out.push_str(&s[last..]);
                Value::String(out)
            }
            Value::Array(a) => Value::Array(
                a.iter()
                    .enumerate()
                    .map(|(i, x)| self.render(x, &format!("{pointer}/{i}")))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| {
                        Ok::<_, (String, String)>((
                            k.clone(),
                            self.render(x, &format!("{pointer}/{k}"))?,
                        ))
                    })
                    .collect::<Result<serde_json::Map<String, Value>, _>>()?,
            ),
            other => other.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_references_keep_their_type_and_inline_ones_become_text() {
        let params = BTreeMap::from([("n".to_owned(), json!(3))]);
        let mut scope = Scope {
            params: Some(&params),
            run_id: "r1",
            run_name: "wf",
            ..Scope::default()
        };
        scope.steps.insert(
            "build",
            StepValue {
                state: "succeeded".into(),
                result: json!({"artifact": "a.tgz", "sizes": [1, 2]}),
            },
        );
        let out = scope
            .render(
                &json!({
                    "n": "{{ params.n }}",
                    "msg": "got {{steps.build.result.artifact}} x{{ params.n }} in {{ run.id }}",
                    "second": "{{ steps.build.result.sizes.1 }}",
                    "state": "{{ steps.build.state }}",
                }),
                "/payload",
            )
            .unwrap();
        assert_eq!(
            out,
            json!({"n": 3, "msg": "got a.tgz x3 in r1", "second": 2, "state": "succeeded"})
        );
        let (ptr, msg) = scope
            .render(&json!({"a": ["{{ steps.build.result.nope }}"]}), "/payload")
            .unwrap_err();
        assert_eq!(ptr, "/payload/a/0");
        assert!(msg.contains("no `nope`"), "{msg}");
    }

    #[test]
    fn references_are_found_with_pointers_and_bad_ones_named() {
        let mut out = Vec::new();
        references(
            &json!({"x": ["{{ params.a }}", "{{ steps.b.result }}{{ item.k }}"], "y": "{{ oops }}", "z": "{{ open"}),
            "/p",
            &mut out,
        );
        assert_eq!(out[0], ("/p/x/0".into(), Reference::Param("a".into())));
        assert_eq!(out[1], ("/p/x/1".into(), Reference::Step("b".into())));
        assert_eq!(out[2], ("/p/x/1".into(), Reference::Item));
        assert!(matches!(&out[3], (p, Reference::Invalid(_)) if p == "/p/y"));
        assert!(matches!(&out[4], (p, Reference::Invalid(_)) if p == "/p/z"));
    }
}
