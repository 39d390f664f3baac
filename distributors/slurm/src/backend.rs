//! `SlurmDistributor`: the [`Distributor`] implementation.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distributor_core::reexports::async_trait;
use distributor_core::{
    AbnormalKind, AdapterHandle, Capabilities, Distributor, DistributorName, Error, Execution,
    Launch, Notification, Outcome, RequestId, Result, Status, TaskDescription, Token,
    ValidationError, Violation,
};
use serde_json::{Value, json};
use url::Url;

use crate::config::{SlurmConfig, SlurmPayload};
use crate::core::Client;
use crate::error::{Class, Failure};
use crate::job::{JobId, JobInfo, JobSpec, argv_script, request_marker};

/// Version of the [`AdapterHandle`] layout `run` writes: `{"job_id": N, "api_version": "…"}`.
const HANDLE_VERSION: u32 = 1;

/// How many request id → job id pairs an instance remembers (beyond that, `run` asks Slurm).
const REMEMBERED_LAUNCHES: usize = 4096;

/// A `slurm` distributor instance: submits batch jobs through slurmrestd.
///
/// Capabilities: cancel, batch status (one `GET /jobs` for many executions). No push: Slurm
/// cannot call back, so the engine polls at the configured `poll_interval_secs`.
#[derive(Debug)]
pub struct SlurmDistributor {
    name: DistributorName,
    config: SlurmConfig,
    client: Client,
    info_url: String,
    /// Jobs this instance submitted or found, by request id (bounded).
    launched: Mutex<HashMap<RequestId, JobId>>,
    /// One lock per request id being run, so concurrent `run`s of one request id submit once.
    running: Mutex<HashMap<RequestId, Arc<tokio::sync::Mutex<()>>>>,
    lookup: Lookup,
}

/// Single-flight listing of the jobs carrying a request marker. A caller reuses a listing only
/// if it started after the caller asked, so it always sees every job submitted before `run`
/// was called; concurrent `run`s share one `GET /jobs`.
/// Jobs carrying a request marker, by marker.
type Markers = Arc<HashMap<String, JobId>>;

#[derive(Debug, Default)]
struct Lookup {
    started: AtomicU64,
    /// The last listing: its generation and the jobs by marker.
    last: tokio::sync::Mutex<Option<(u64, Markers)>>,
}

impl Lookup {
    async fn markers(&self, client: &Client, user: &str) -> Result<Markers, Failure> {
        let entered = self.started.load(Ordering::SeqCst);
        let mut last = self.last.lock().await;
        if let Some((generation, map)) = &*last
            && *generation > entered
        {
            return Ok(map.clone());
        }
        let generation = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let jobs = client.jobs().await?;
        let map: HashMap<String, JobId> = jobs
            .into_iter()
            .filter(|j| j.user_name == user && j.comment.starts_with("distributor:"))
            .map(|j| (j.comment, j.job_id))
            .collect();
        let map = Arc::new(map);
        *last = Some((generation, map.clone()));
        Ok(map)
    }
}

impl SlurmDistributor {
    /// Builds an instance. Errors are permanent (the token cannot be read, the HTTP client
    /// cannot be built); nothing is sent to slurmrestd yet.
    pub fn new(config: SlurmConfig, name: DistributorName) -> Result<Self> {
        let client = Client::new(&config)?;
        let info_url = config
            .info_url
            .clone()
            .unwrap_or_else(|| format!("{{url}}/slurm/{}/job/{{job_id}}", config.api_version));
        Ok(Self {
            name,
            config,
            client,
            info_url,
            launched: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            lookup: Lookup::default(),
        })
    }

    fn remembered(&self, request_id: &RequestId) -> Option<JobId> {
        lock(&self.launched).get(request_id).copied()
    }

    fn remember(&self, request_id: &RequestId, job: JobId) {
        let mut m = lock(&self.launched);
        if m.len() >= REMEMBERED_LAUNCHES {
            m.clear();
        }
        m.insert(request_id.clone(), job);
    }

    fn launch(&self, job: JobId) -> Launch {
        Launch {
            token: Token::new(job.to_string()),
            handle: AdapterHandle {
                version: HANDLE_VERSION,
                data: json!({ "job_id": job.0, "api_version": self.config.api_version }),
            },
            poll_interval: Some(Duration::from_secs(self.config.poll_interval_secs)),
        }
    }

    /// The job spec for a task.
    fn spec(&self, task: &TaskDescription, payload: SlurmPayload) -> JobSpec {
        let script = match (payload.script, payload.argv) {
            (Some(s), _) => s,
            (None, Some(argv)) => argv_script(&argv),
            (None, None) => String::new(), // refused by `check_payload` before
        };
        let mut environment: BTreeMap<String, String> = self.config.environment.clone();
        environment.extend(payload.environment);
        environment
            .entry("PATH".into())
            .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
        JobSpec {
            script,
            name: payload
                .name
                .unwrap_or_else(|| format!("distributor-{}", task.execution_id)),
            comment: request_marker(&task.request_id),
            partition: payload.partition.or_else(|| self.config.partition.clone()),
            cpus_per_task: payload.cpus,
            memory_per_node_mb: payload.memory_mb,
            time_limit_minutes: payload.time_limit_minutes,
            environment,
            working_directory: payload
                .working_directory
                .or_else(|| self.config.working_directory.clone()),
            stdout: payload.stdout,
            stderr: payload.stderr,
            options: payload.options,
        }
    }

    /// Maps a job slurmctld reported (or its absence) to the execution's status.
    fn job_status(&self, execution: &Execution, job: Option<&JobInfo>) -> Status {
        let Some(job) = job else {
            return missing(format!(
                "slurm no longer knows job {} (finished more than MinJobAge ago, or never existed)",
                execution.token
            ));
        };
        if job.comment != request_marker(&execution.request_id) {
            return missing(format!(
                "slurm job {} is not this execution's job (its comment is {:?})",
                job.job_id, job.comment
            ));
        }
        job.to_status()
    }
}

fn missing(reason: String) -> Status {
    Status::Finished(Outcome::abnormal(AbnormalKind::Missing, reason))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Semantic payload checks the schema cannot express.
fn check_payload(payload: &Value) -> Result<SlurmPayload, ValidationError> {
    let violation = |pointer: &str, expected: &str, message: String| Violation {
        pointer: pointer.to_owned(),
        expected: expected.to_owned(),
        message,
        suggestion: None,
    };
    let invalid = |violations: Vec<Violation>| ValidationError {
        subject: "payload for kind `slurm`".to_owned(),
        violations,
    };
    let p: SlurmPayload = serde_json::from_value(payload.clone())
        .map_err(|e| invalid(vec![violation("", "a slurm payload", e.to_string())]))?;
    let mut v = Vec::new();
    match (&p.script, &p.argv) {
        (None, None) => v.push(violation(
            "",
            "`script` or `argv`",
            "one of `script` or `argv` is required".into(),
        )),
        (Some(_), Some(_)) => v.push(violation(
            "/argv",
            "no `argv` when `script` is given",
            "give `script` or `argv`, not both".into(),
        )),
        _ => {}
    }
    if let Some(s) = &p.script
        && !s.starts_with("#!")
    {
        v.push(violation(
            "/script",
            "a script starting with `#!`",
            "the script must start with `#!` and an interpreter, as for sbatch".into(),
        ));
    }
    if p.argv.as_ref().is_some_and(Vec::is_empty) {
        v.push(violation(
            "/argv",
            "a non-empty list",
            "`argv` is empty".into(),
        ));
    }
    for key in p.environment.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            let escaped = key.replace('~', "~0").replace('/', "~1");
            v.push(violation(
                &format!("/environment/{escaped}"),
                "a variable name without `=`",
                format!("{key:?} is not a valid environment variable name"),
            ));
        }
    }
    if v.is_empty() { Ok(p) } else { Err(invalid(v)) }
}

#[async_trait]
impl Distributor for SlurmDistributor {
    /// Submits the job, unless a job carrying this request id already exists (looked up in
    /// this instance's memory, then in slurmctld's job list by the job comment).
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        let payload = check_payload(&task.payload).map_err(Error::Validation)?;
        let gate = lock(&self.running)
            .entry(task.request_id.clone())
            .or_default()
            .clone();
        let result = async {
            let _held = gate.lock().await;
            if let Some(job) = self.remembered(&task.request_id) {
                return Ok(self.launch(job));
            }
            // A first dispatch cannot have a job yet: skip the listing (a full `GET /jobs` in
            // v0.0.38). A repeated one (the engine retried, or restarted mid-dispatch) looks
            // for the job carrying this request id before submitting.
            if task.redispatch {
                let markers = self
                    .lookup
                    .markers(&self.client, &self.config.user)
                    .await
                    .map_err(|f| f.into_error("looking for an existing job"))?;
                if let Some(job) = markers.get(&request_marker(&task.request_id)) {
                    self.remember(&task.request_id, *job);
                    return Ok(self.launch(*job));
                }
            }
            let job = self
                .client
                .submit(&self.spec(task, payload))
                .await
                .map_err(|f| f.into_error("submitting the job"))?;
            tracing::debug!(distributor = %self.name, job_id = %job, request_id = %task.request_id, "submitted");
            self.remember(&task.request_id, job);
            Ok(self.launch(job))
        }
        .await;
        let mut running = lock(&self.running);
        if Arc::strong_count(&gate) <= 2 {
            running.remove(&task.request_id);
        }
        result
    }

    /// Cancels the job with `DELETE` (SIGKILL) if it is this execution's and still active.
    /// Unknown, foreign and finished jobs are Ok.
    async fn cancel(&self, execution: &Execution) -> Result<()> {
        let Some(id) = JobId::parse(execution.token.as_str()) else {
            return Ok(());
        };
        let job = self
            .client
            .job(id)
            .await
            .map_err(|f| f.into_error("reading the job before cancelling"))?;
        match job {
            Some(j) if j.comment == request_marker(&execution.request_id) => {
                if j.to_status().outcome().is_some() {
                    return Ok(());
                }
            }
            _ => return Ok(()),
        }
        self.client
            .cancel(id)
            .await
            .map_err(|f| f.into_error("cancelling the job"))
    }

    async fn status(&self, execution: &Execution) -> Result<Status> {
        let Some(id) = JobId::parse(execution.token.as_str()) else {
            return Ok(missing(format!(
                "`{}` is not a slurm job id",
                execution.token
            )));
        };
        let job = self
            .client
            .job(id)
            .await
            .map_err(|f| f.into_error("reading the job"))?;
        Ok(self.job_status(execution, job.as_ref()))
    }

    /// One `GET /jobs` for all executions (for a single one, one `GET /job/{id}`).
    async fn status_batch(&self, executions: &[Execution]) -> Vec<Result<Status>> {
        if executions.len() <= 1 {
            let mut out = Vec::with_capacity(executions.len());
            for e in executions {
                out.push(self.status(e).await);
            }
            return out;
        }
        match self.client.jobs().await {
            Ok(jobs) => {
                let by_id: HashMap<JobId, JobInfo> =
                    jobs.into_iter().map(|j| (j.job_id, j)).collect();
                executions
                    .iter()
                    .map(|e| match JobId::parse(e.token.as_str()) {
                        Some(id) => Ok(self.job_status(e, by_id.get(&id))),
                        None => Ok(missing(format!("`{}` is not a slurm job id", e.token))),
                    })
                    .collect()
            }
            Err(f) => {
                let transient = f.class() == Class::Transient;
                let message = format!("listing jobs: {f}");
                executions
                    .iter()
                    .map(|_| {
                        Err(if transient {
                            Error::transient(message.clone())
                        } else {
                            Error::permanent(message.clone())
                        })
                    })
                    .collect()
            }
        }
    }

    /// The `info_url` template with `{job_id}`, `{user}` and `{url}` substituted; `None` for
    /// tokens that are not job ids or when the result is not a URL.
    fn info_url(&self, execution: &Execution) -> Option<Url> {
        let id = JobId::parse(execution.token.as_str())?;
        let s = self
            .info_url
            .replace("{job_id}", &id.to_string())
            .replace("{user}", &self.config.user)
            .replace("{url}", self.config.url.as_str().trim_end_matches('/'));
        Url::parse(&s).ok()
    }

    /// Slurm does not push; every notification is ignored.
    async fn handle_notification(
        &self,
        _execution: &Execution,
        _notification: &Notification,
    ) -> Result<Option<Status>> {
        Ok(None)
    }

    fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        check_payload(payload).map(|_| ())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            push_notifications: false,
            cancel: true,
            batch_status: true,
            recover: false,
            deferred: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use distributor_core::{Attempt, AuthToken, ExecutionId, NotificationRoute, TaskId, Timeouts};

    use super::*;
    use crate::config::{ApiVersion, TokenSource, resolve_token};

    fn config() -> SlurmConfig {
        SlurmConfig {
            url: Url::parse("http://127.0.0.1:9/").expect("url"),
            user: "ci".into(),
            token: TokenSource::Value("t".into()),
            api_version: ApiVersion::V0038,
            partition: Some("debug".into()),
            working_directory: Some("/srv".into()),
            environment: BTreeMap::from([("A".to_string(), "config".to_string())]),
            info_url: None,
            poll_interval_secs: 5,
            request_timeout_secs: 1,
        }
    }

    fn exec(token: &str) -> Execution {
        Execution {
            id: ExecutionId(1),
            task_id: TaskId(1),
            attempt: Attempt(1),
            request_id: RequestId::new("r1"),
            payload: json!({}),
            token: Token::new(token),
            handle: AdapterHandle::default(),
        }
    }

    fn task(payload: Value) -> TaskDescription {
        TaskDescription {
            execution_id: ExecutionId(42),
            task_id: TaskId(42),
            attempt: Attempt(1),
            request_id: RequestId::new("r1"),
            redispatch: false,
            distributor: DistributorName::new("hpc"),
            payload,
            previous: None,
            notify: NotificationRoute {
                target: None,
                auth_token: AuthToken("x".into()),
            },
            timeouts: Timeouts::default(),
            labels: Default::default(),
        }
    }

    fn pointers(e: ValidationError) -> Vec<String> {
        e.violations.into_iter().map(|v| v.pointer).collect()
    }

    #[test]
    fn payload_needs_exactly_one_command() {
        assert_eq!(pointers(check_payload(&json!({})).expect_err("none")), [""]);
        assert_eq!(
            pointers(
                check_payload(&json!({"script": "#!/bin/sh\n", "argv": ["x"]})).expect_err("both")
            ),
            ["/argv"]
        );
        assert_eq!(
            pointers(check_payload(&json!({"script": "echo hi"})).expect_err("no #!")),
            ["/script"]
        );
        assert_eq!(
            pointers(
                check_payload(&json!({"argv": ["true"], "environment": {"A=B": "x"}}))
                    .expect_err("bad env")
            ),
            ["/environment/A=B"]
        );
        assert!(check_payload(&json!({"argv": ["true"]})).is_ok());
    }

    #[test]
    fn spec_merges_config_defaults_and_marks_the_request() {
        let d = SlurmDistributor::new(config(), DistributorName::new("hpc")).expect("builds");
        let payload: SlurmPayload = serde_json::from_value(json!({
            "argv": ["echo", "hi"], "environment": {"B": "payload"}, "time_limit_minutes": 3
        }))
        .expect("payload");
        let spec = d.spec(&task(json!({})), payload);
        assert_eq!(spec.script, "#!/bin/sh\nexec echo hi\n");
        assert_eq!(spec.name, "distributor-42");
        assert_eq!(spec.comment, "distributor:request_id=r1");
        assert_eq!(spec.partition.as_deref(), Some("debug"));
        assert_eq!(spec.working_directory.as_deref(), Some("/srv"));
        assert_eq!(spec.time_limit_minutes, Some(3));
        assert_eq!(spec.environment["A"], "config");
        assert_eq!(spec.environment["B"], "payload");
        assert!(spec.environment.contains_key("PATH"));
    }

    #[test]
    fn info_url_defaults_to_the_rest_job_url_and_follows_templates() {
        let d = SlurmDistributor::new(config(), DistributorName::new("hpc")).expect("builds");
        assert_eq!(
            d.info_url(&exec("17")).map(String::from).as_deref(),
            Some("http://127.0.0.1:9/slurm/v0.0.38/job/17")
        );
        assert_eq!(d.info_url(&exec("not-a-job")), None);
        let mut c = config();
        c.info_url = Some("https://portal.example/jobs/{job_id}?u={user}".into());
        let d = SlurmDistributor::new(c, DistributorName::new("hpc")).expect("builds");
        assert_eq!(
            d.info_url(&exec("17")).map(String::from).as_deref(),
            Some("https://portal.example/jobs/17?u=ci")
        );
    }

    #[tokio::test]
    async fn bogus_tokens_are_missing_and_cancel_ok_without_io() {
        let d = SlurmDistributor::new(config(), DistributorName::new("hpc")).expect("builds");
        let s = d.status(&exec("no-such-token")).await.expect("status");
        assert_eq!(
            s.outcome().and_then(Outcome::abnormal_kind),
            Some(AbnormalKind::Missing)
        );
        d.cancel(&exec("no-such-token")).await.expect("cancel");
    }

    #[tokio::test]
    async fn unreachable_slurmrestd_is_transient() {
        let d = SlurmDistributor::new(config(), DistributorName::new("hpc")).expect("builds");
        let e = d
            .status(&exec("5"))
            .await
            .expect_err("nothing listens on port 9");
        assert!(e.is_transient(), "{e}");
        let e = d
            .run(&task(json!({"argv": ["true"]})))
            .await
            .expect_err("no server");
        assert!(e.is_transient(), "{e}");
        let batch = d.status_batch(&[exec("5"), exec("6")]).await;
        assert!(
            batch
                .iter()
                .all(|r| r.as_ref().is_err_and(Error::is_transient))
        );
    }

    #[tokio::test]
    async fn run_rejects_bad_payloads_permanently() {
        let d = SlurmDistributor::new(config(), DistributorName::new("hpc")).expect("builds");
        let e = d
            .run(&task(json!({"script": "no shebang"})))
            .await
            .expect_err("invalid");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("/script"), "{e}");
    }

    #[test]
    fn token_sources_resolve() {
        assert_eq!(
            resolve_token(&TokenSource::Value(" SLURM_JWT=abc\n".into())).expect("value"),
            "abc"
        );
        let e = resolve_token(&TokenSource::Env("DISTRIBUTOR_SLURM_NO_SUCH_VAR".into()))
            .expect_err("no such variable");
        assert!(
            e.to_string().contains("DISTRIBUTOR_SLURM_NO_SUCH_VAR"),
            "{e}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("jwt");
        std::fs::write(&f, "SLURM_JWT=xyz\n").expect("write");
        assert_eq!(resolve_token(&TokenSource::File(f)).expect("file"), "xyz");
        assert!(resolve_token(&TokenSource::Value("  ".into())).is_err());
        assert_eq!(
            format!("{:?}", TokenSource::Value("secret".into())),
            "Secret::Value(<redacted>)"
        );
    }

    #[test]
    fn the_token_is_redacted_from_the_serialized_config() {
        let mut c = config();
        c.token = TokenSource::Value("jwt-literal".into());
        let v = serde_json::to_value(&c).expect("serialize");
        assert_eq!(v["token"], serde_json::json!({"redacted": true}));
        c.token = TokenSource::Env("SLURM_JWT".into());
        let v = serde_json::to_value(&c).expect("serialize");
        assert_eq!(v["token"], serde_json::json!({"env": "SLURM_JWT"}));
    }
}
