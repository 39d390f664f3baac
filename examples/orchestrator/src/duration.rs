//! Human durations in files and on the wire: `"500ms"`, `"2s"`, `"1.5m"`, `"1h"`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written with a unit (`ms`, `s`, `m`, `h`), such as `"30s"` or `"1.5m"`.
///
/// Bare numbers are refused on purpose: `run = 2` could mean 2 ms or 2 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses `"<number><unit>"`; the unit is one of `ms`, `s`, `m`, `h`.
    ///
    /// Errors: an empty string, a missing or unknown unit, or a number that is negative, not
    /// finite or too large, with the accepted forms in the message.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.starts_with('-') {
            return Err(format!(
                "`{s}` is negative; a duration is zero or more, like \"30s\""
            ));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "" => {
                return Err(format!(
                    "`{s}` has no unit; write a duration like \"500ms\", \"30s\", \"2m\" or \"1h\""
                ));
            }
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{s}`; use ms, s, m or h (e.g. \"30s\")"
                ));
            }
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration like \"500ms\", \"30s\" or \"2m\""))?;
        Duration::try_from_secs_f64(n * scale)
            .map(Self)
            .map_err(|_| format!("`{s}` is out of range"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 || !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else if ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]+(\\.[0-9]+)?(ms|s|m|min|h)$",
            "description": "A duration with a unit: \"500ms\", \"30s\", \"1.5m\", \"1h\".",
            "examples": ["30s"]
        })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, like \"500ms\", \"30s\" or \"2m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                HumanDuration::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Formats an elapsed time for people: `350ms`, `1.2s`, `2m05s`.
pub fn elapsed(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_fractions() {
        let p = |s| HumanDuration::parse(s).map(|d| d.0);
        assert_eq!(p("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(p("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(p("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(p(" 1h "), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn refuses_bare_numbers_and_unknown_units() {
        assert!(HumanDuration::parse("2").unwrap_err().contains("no unit"));
        assert!(
            HumanDuration::parse("2d")
                .unwrap_err()
                .contains("unknown unit `d`")
        );
        assert!(HumanDuration::parse("s").is_err());
        assert!(HumanDuration::parse("").is_err());
    }

    #[test]
    fn displays_in_the_largest_whole_unit() {
        let d = |ms| HumanDuration(Duration::from_millis(ms)).to_string();
        assert_eq!(d(1500), "1500ms");
        assert_eq!(d(2000), "2s");
        assert_eq!(d(120_000), "2m");
        assert_eq!(d(7_200_000), "2h");
        assert_eq!(elapsed(Duration::from_millis(1234)), "1.2s");
        assert_eq!(elapsed(Duration::from_secs(125)), "2m05s");
    }
}
