//! The switch's routing state and its rules: times and the grid, the cutover, what was
//! dispatched to each side, the history of changes, and control requests.
//!
//! # Durable state
//!
//! Kept in the instance's [`InstanceState`] (the engine's store), in two values:
//!
//! - `cutover`: the cutover time (or none) and the bounded history of changes to it (who, why,
//!   when, from, to), written together so that a change and its record cannot part;
//! - `dispatched`: what has been handed to each side, as watermarks: the latest end of an
//!   interval sent to `before` and the earliest start of one sent to `after`. It is written
//!   *before* the side's `run` is called, so a crash between the two still protects the
//!   interval.
//!
//! Every read-modify-write of them runs under one lock per state key in the process, shared
//! by every instance built over the same name (the engine builds more than one when executions
//! of an older config are still in flight).
//!
//! # Rules
//!
//! - A task's side: `after` if a cutover is set and the task's interval starts at or after it,
//!   else `before` (the two predicates are exact complements, as in Swarming's export switch).
//! - A task whose interval contains the cutover (starts before it, ends after it) is refused:
//!   neither side may run part of the other's time.
//! - A cutover MUST lie on the grid. Setting, moving or clearing it is refused if that would
//!   change the side of anything already dispatched: it MUST NOT be earlier than the end of
//!   an interval already sent to `before`, nor later than the start of one already sent to
//!   `after` (and it cannot be cleared once `after` has run anything).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use distributor_core::{InstanceState, Result, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::{Side, TimeSpec};
use crate::error::SwitchError;

const CUTOVER_KEY: &str = "cutover";
const DISPATCHED_KEY: &str = "dispatched";

/// The span of time a task covers, in ms since the epoch: `[start, end)`, `end >= start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Interval {
    pub(crate) start: i64,
    pub(crate) end: i64,
}

impl Interval {
    pub(crate) fn new(start: i64, len_ms: u64) -> Self {
        let len = i64::try_from(len_ms).unwrap_or(i64::MAX);
        Self {
            start,
            end: start.saturating_add(len),
        }
    }

    /// Whether `t` lies strictly inside (a cutover there would split it).
    pub(crate) fn contains_strictly(self, t: i64) -> bool {
        self.start < t && t < self.end
    }

    /// The earliest cutover that leaves the interval wholly before it: its end, or just after
    /// its start for an instant.
    fn before_bound(self) -> i64 {
        self.end.max(self.start.saturating_add(1))
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.end == self.start {
            write!(f, "the instant {}", format_time(self.start))
        } else {
            write!(
                f,
                "[{}, {})",
                format_time(self.start),
                format_time(self.end)
            )
        }
    }
}

/// One change of the cutover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Change {
    /// When it was made (ms).
    pub(crate) at: i64,
    /// Who made it.
    pub(crate) who: String,
    /// Why.
    pub(crate) why: String,
    /// The cutover before (ms), none if unset.
    pub(crate) from: Option<i64>,
    /// The cutover after (ms), none if cleared.
    pub(crate) to: Option<i64>,
}

/// The `cutover` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CutoverState {
    pub(crate) cutover: Option<i64>,
    pub(crate) history: Vec<Change>,
}

/// The `dispatched` value: watermarks of what each side has been handed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Dispatched {
    /// The interval sent to `before` that reaches furthest (by [`Interval::before_bound`]).
    pub(crate) before_latest: Option<Interval>,
    /// The interval sent to `after` that starts earliest.
    pub(crate) after_earliest: Option<Interval>,
}

impl Dispatched {
    /// Records `interval` on `side`; returns whether a watermark moved.
    fn record(&mut self, side: Side, interval: Interval) -> bool {
        match side {
            Side::Before => {
                let moved = self
                    .before_latest
                    .is_none_or(|l| interval.before_bound() > l.before_bound());
                if moved {
                    self.before_latest = Some(interval);
                }
                moved
            }
            Side::After => {
                let moved = self.after_earliest.is_none_or(|e| interval.start < e.start);
                if moved {
                    self.after_earliest = Some(interval);
                }
                moved
            }
        }
    }
}

/// The routing state of one switch instance: its durable values and the lock that serialises
/// changes to them.
#[derive(Debug, Clone)]
pub(crate) struct Router {
    state: InstanceState,
    lock: Arc<tokio::sync::Mutex<()>>,
    grid_ms: i64,
    history_limit: usize,
}

/// One lock per state key prefix in the process (see the module docs).
fn lock_for(key: String) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(l) = locks.get(&key).and_then(Weak::upgrade) {
        return l;
    }
    locks.retain(|_, w| w.strong_count() > 0);
    let l = Arc::new(tokio::sync::Mutex::new(()));
    locks.insert(key, Arc::downgrade(&l));
    l
}

/// What `route` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) side: Side,
    pub(crate) interval: Interval,
}

impl Router {
    pub(crate) fn new(state: InstanceState, grid_secs: u64, history_limit: u32) -> Self {
        Self {
            lock: lock_for(state.store_key("")),
            state,
            grid_ms: i64::try_from(grid_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            history_limit: history_limit.max(1) as usize,
        }
    }

    async fn cutover_state(&self) -> Result<CutoverState> {
        Ok(self
            .state
            .get_json::<CutoverState>(CUTOVER_KEY)
            .await?
            .unwrap_or_default())
    }

    async fn dispatched(&self) -> Result<Dispatched> {
        Ok(self
            .state
            .get_json::<Dispatched>(DISPATCHED_KEY)
            .await?
            .unwrap_or_default())
    }

    /// Decides the side of a task covering `interval` and records the hand-off durably before
    /// returning it. The caller then calls that side's `run`.
    ///
    /// Errors: [`SwitchError::Straddles`] if the interval contains the cutover; store errors.
    pub(crate) async fn route(&self, interval: Interval) -> Result<Route> {
        let _guard = self.lock.lock().await;
        let cutover = self.cutover_state().await?.cutover;
        let side = match cutover {
            Some(c) if interval.contains_strictly(c) => {
                return Err(SwitchError::Straddles {
                    interval,
                    cutover: c,
                }
                .into());
            }
            Some(c) if interval.start >= c => Side::After,
            _ => Side::Before,
        };
        let mut d = self.dispatched().await?;
        if d.record(side, interval) {
            self.state.put_json(DISPATCHED_KEY, &d).await?;
        }
        Ok(Route { side, interval })
    }

    /// Applies a parsed control request and answers with the state after it.
    pub(crate) async fn control(&self, request: Request, now: i64) -> Result<Value> {
        let _guard = self.lock.lock().await;
        let mut cs = self.cutover_state().await?;
        let dispatched = self.dispatched().await?;
        match request {
            Request::Show => {}
            Request::Set { to, who, why } => {
                let to = match to {
                    Target::At(t) => {
                        if t.rem_euclid(self.grid_ms) != 0 {
                            let below = t - t.rem_euclid(self.grid_ms);
                            return Err(SwitchError::OffGrid {
                                cutover: t,
                                grid_ms: self.grid_ms,
                                below,
                                above: below.saturating_add(self.grid_ms),
                            }
                            .into());
                        }
                        t
                    }
                    Target::In(ms) => ceil_to_grid(now.saturating_add(ms), self.grid_ms),
                };
                check_keeps_dispatched(&dispatched, Some(to))?;
                if cs.cutover != Some(to) {
                    self.record(&mut cs, now, who, why, Some(to)).await?;
                }
            }
            Request::Clear { who, why } => {
                check_keeps_dispatched(&dispatched, None)?;
                if cs.cutover.is_some() {
                    self.record(&mut cs, now, who, why, None).await?;
                }
            }
        }
        Ok(self.describe(&cs, &dispatched))
    }

    async fn record(
        &self,
        cs: &mut CutoverState,
        now: i64,
        who: String,
        why: String,
        to: Option<i64>,
    ) -> Result<()> {
        cs.history.push(Change {
            at: now,
            who,
            why,
            from: cs.cutover,
            to,
        });
        let excess = cs.history.len().saturating_sub(self.history_limit);
        cs.history.drain(..excess);
        cs.cutover = to;
        self.state.put_json(CUTOVER_KEY, cs).await
    }

    fn describe(&self, cs: &CutoverState, d: &Dispatched) -> Value {
        let span = |i: &Option<Interval>| {
            i.map(|i| json!({ "start": format_time(i.start), "end": format_time(i.end) }))
        };
        json!({
            "mode": if cs.cutover.is_some() { "switching" } else { "before_only" },
            "cutover": cs.cutover.map(format_time),
            "cutover_ms": cs.cutover,
            "grid_secs": self.grid_ms / 1000,
            "dispatched": {
                "before_latest": span(&d.before_latest),
                "after_earliest": span(&d.after_earliest),
            },
            "history": cs.history.iter().map(|c| json!({
                "at": format_time(c.at),
                "who": c.who,
                "why": c.why,
                "from": c.from.map(format_time),
                "to": c.to.map(format_time),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Refuses a cutover (`None`: cleared) that would change the side of dispatched work.
fn check_keeps_dispatched(d: &Dispatched, to: Option<i64>) -> Result<(), SwitchError> {
    if let (Some(b), Some(c)) = (d.before_latest, to)
        && c < b.before_bound()
    {
        return Err(SwitchError::BeforeDispatched {
            cutover: c,
            interval: b,
        });
    }
    if let Some(a) = d.after_earliest
        && to.is_none_or(|c| c > a.start)
    {
        return Err(SwitchError::AfterDispatched {
            cutover: to,
            interval: a,
        });
    }
    Ok(())
}

fn ceil_to_grid(t: i64, grid: i64) -> i64 {
    let r = t.rem_euclid(grid);
    if r == 0 { t } else { t - r + grid }
}

/// Where a `set` request puts the cutover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// At this time (ms); MUST be on the grid.
    At(i64),
    /// This many ms from now, rounded up to the grid.
    In(i64),
}

/// A parsed control request (see the crate docs for the JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Show,
    Set {
        to: Target,
        who: String,
        why: String,
    },
    Clear {
        who: String,
        why: String,
    },
}

impl Request {
    /// Parses a control request.
    ///
    /// Errors: [`SwitchError::BadRequest`] naming the field by JSON Pointer.
    pub(crate) fn parse(v: &Value) -> Result<Self, SwitchError> {
        let bad = |pointer: &str, message: String| SwitchError::BadRequest {
            pointer: pointer.to_owned(),
            message,
        };
        let Some(obj) = v.as_object() else {
            return Err(bad("", "expected an object with `op`".into()));
        };
        let op = obj
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("/op", "expected one of `show`, `set`, `clear`".into()))?;
        let allowed: &[&str] = match op {
            "show" => &["op"],
            "set" => &["op", "cutover", "who", "why"],
            "clear" => &["op", "who", "why"],
            other => {
                return Err(bad(
                    "/op",
                    format!("unknown op `{other}`; expected one of `show`, `set`, `clear`"),
                ));
            }
        };
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(bad(
                &format!("/{k}"),
                format!("unknown field for op `{op}`; expected {allowed:?}"),
            ));
        }
        let text = |field: &str| -> Result<String, SwitchError> {
            match obj.get(field).and_then(Value::as_str).map(str::trim) {
                Some(s) if !s.is_empty() => Ok(s.to_owned()),
                _ => Err(bad(
                    &format!("/{field}"),
                    format!(
                        "required: a non-empty string saying {}",
                        match field {
                            "who" => "who makes the change",
                            _ => "why the change is made",
                        }
                    ),
                )),
            }
        };
        match op {
            "show" => Ok(Self::Show),
            "set" => {
                let to = match obj.get("cutover") {
                    None => return Err(bad("/cutover", "required: the cutover time".into())),
                    Some(Value::String(s)) if s.trim_start().starts_with('+') => {
                        let d = parse_duration_ms(s.trim_start()[1..].trim())
                            .map_err(|m| bad("/cutover", m))?;
                        Target::In(d)
                    }
                    Some(v) => {
                        let spec: TimeSpec = serde_json::from_value(v.clone()).map_err(|_| {
                            bad(
                                "/cutover",
                                "expected an RFC 3339 time, milliseconds since the epoch, or \
                                 `+<duration>`"
                                    .into(),
                            )
                        })?;
                        Target::At(resolve_time(&spec).map_err(|m| bad("/cutover", m))?)
                    }
                };
                Ok(Self::Set {
                    to,
                    who: text("who")?,
                    why: text("why")?,
                })
            }
            _ => Ok(Self::Clear {
                who: text("who")?,
                why: text("why")?,
            }),
        }
    }
}

/// The interval of a (validated) switch payload, `submitted_at` standing in for a missing
/// start.
pub(crate) fn interval_of(payload: &Value, fallback: Timestamp) -> Result<Interval, SwitchError> {
    let start = match payload.get("interval_start") {
        None | Some(Value::Null) => fallback.0,
        Some(v) => {
            let spec: TimeSpec =
                serde_json::from_value(v.clone()).map_err(|e| SwitchError::BadPayload {
                    pointer: "/interval_start".into(),
                    message: e.to_string(),
                })?;
            resolve_time(&spec).map_err(|message| SwitchError::BadPayload {
                pointer: "/interval_start".into(),
                message,
            })?
        }
    };
    let len = payload
        .get("interval_ms")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(Interval::new(start, len))
}

/// A time spec in ms since the epoch.
pub(crate) fn resolve_time(spec: &TimeSpec) -> Result<i64, String> {
    match spec {
        TimeSpec::Millis(ms) => Ok(*ms),
        TimeSpec::Text(s) => parse_rfc3339(s),
    }
}

/// `1500ms`, `15s`, `5m`, `2h`, `1d`.
pub(crate) fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like `5m`, `90s`, `1h`"))?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}`; use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{s}` is too long"))
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (RFC 3339; `t`/space for `T`, `z` for `Z`).
pub(crate) fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let err = || format!("`{s}` is not an RFC 3339 time like `2026-12-02T15:04:00Z`");
    let b = s.as_bytes();
    if b.len() < 20 || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(err());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = s.get(r).ok_or_else(err)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().map_err(|_| err())
        } else {
            Err(err())
        }
    };
    if b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return Err(err());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut frac_ms = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return Err(err());
        }
        let digits = &s[start..i.min(start + 3)];
        frac_ms = digits.parse::<i64>().map_err(|_| err())? * 10_i64.pow(3 - digits.len() as u32);
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(c @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return Err(err());
            }
            let m = oh * 60 + om;
            if *c == b'-' { -m } else { m }
        }
        _ => return Err(err()),
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month[(mo - 1) as usize] {
        return Err(format!("`{s}`: no such date"));
    }
    if h > 23 || mi > 59 || sec > 60 {
        return Err(format!("`{s}`: no such time of day"));
    }
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset_min * 60;
    Ok(secs * 1000 + frac_ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `ms` since the epoch as RFC 3339 UTC (`2026-12-02T15:04:00Z`, with `.mmm` when not whole).
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let frac = ms.rem_euclid(1000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    if frac == 0 {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
    } else {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac:03}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_honours_offsets() {
        let t = parse_rfc3339("2026-12-02T15:04:00Z").unwrap();
        assert_eq!(t, 1_796_223_840_000);
        assert_eq!(format_time(t), "2026-12-02T15:04:00Z");
        assert_eq!(parse_rfc3339("2026-12-02T16:04:00+01:00").unwrap(), t);
        assert_eq!(parse_rfc3339("2026-12-02t15:04:00.25z").unwrap(), t + 250);
        assert_eq!(format_time(t + 250), "2026-12-02T15:04:00.250Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z").unwrap(),
            1_709_164_800_000
        );
        assert_eq!(format_time(-1), "1969-12-31T23:59:59.999Z");
        for bad in [
            "2026-12-02",
            "2026-13-02T15:04:00Z",
            "2025-02-29T00:00:00Z",
            "2026-12-02T25:04:00Z",
            "2026-12-02T15:04:00",
            "2026-12-02T15:04:00+0100",
            "2026-12-02T15:04:00.Z",
            "2026-12-02T15:04:00Zjunk",
            "२०२६-12-02T15:04:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert!(parse_duration_ms("5 minutes").is_err());
        assert!(parse_duration_ms("m").is_err());
    }

    #[test]
    fn requests_parse_and_bad_fields_are_named_by_pointer() {
        let set = Request::parse(
            &json!({"op": "set", "cutover": "+5m", "who": "ana", "why": "go exporter checked"}),
        )
        .unwrap();
        assert_eq!(
            set,
            Request::Set {
                to: Target::In(300_000),
                who: "ana".into(),
                why: "go exporter checked".into()
            }
        );
        let pointer = |v: Value| match Request::parse(&v).unwrap_err() {
            SwitchError::BadRequest { pointer, .. } => pointer,
            e => panic!("{e}"),
        };
        assert_eq!(pointer(json!({"op": "sett"})), "/op");
        assert_eq!(
            pointer(json!({"op": "set", "who": "a", "why": "b"})),
            "/cutover"
        );
        assert_eq!(
            pointer(json!({"op": "set", "cutover": "tomorrow", "who": "a", "why": "b"})),
            "/cutover"
        );
        assert_eq!(
            pointer(json!({"op": "set", "cutover": 0, "why": "b"})),
            "/who"
        );
        assert_eq!(
            pointer(json!({"op": "clear", "who": "a", "why": " "})),
            "/why"
        );
        assert_eq!(pointer(json!({"op": "show", "cutover": 0})), "/cutover");
        assert_eq!(pointer(json!([1])), "");
    }

    #[test]
    fn watermarks_keep_the_furthest_before_and_the_earliest_after() {
        let mut d = Dispatched::default();
        assert!(d.record(Side::Before, Interval::new(0, 60_000)));
        assert!(!d.record(Side::Before, Interval::new(0, 15_000)));
        assert!(d.record(Side::After, Interval::new(120_000, 15_000)));
        assert!(d.record(Side::After, Interval::new(60_000, 15_000)));
        assert!(!d.record(Side::After, Interval::new(90_000, 15_000)));
        assert_eq!(check_keeps_dispatched(&d, Some(60_000)), Ok(()));
        assert!(matches!(
            check_keeps_dispatched(&d, Some(0)),
            Err(SwitchError::BeforeDispatched { .. })
        ));
        assert!(matches!(
            check_keeps_dispatched(&d, Some(120_000)),
            Err(SwitchError::AfterDispatched { .. })
        ));
        assert!(matches!(
            check_keeps_dispatched(&d, None),
            Err(SwitchError::AfterDispatched { cutover: None, .. })
        ));
        // An instant sent to `before` needs the cutover strictly after it.
        let mut i = Dispatched::default();
        i.record(Side::Before, Interval::new(60_000, 0));
        assert!(check_keeps_dispatched(&i, Some(60_000)).is_err());
        assert_eq!(check_keeps_dispatched(&i, Some(120_000)), Ok(()));
    }

    #[test]
    fn relative_cutovers_round_up_to_the_grid() {
        assert_eq!(ceil_to_grid(60_001, 60_000), 120_000);
        assert_eq!(ceil_to_grid(120_000, 60_000), 120_000);
        assert_eq!(ceil_to_grid(-1, 60_000), 0);
    }
}
