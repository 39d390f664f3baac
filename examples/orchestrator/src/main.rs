//! Run with: cargo run -p orchestrator -- run examples/demo.toml
//!
//! The reference orchestrator's command line; see the crate README for every command.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use distributor_core::{Engine, Registry};
use orchestrator::api::SubmitRequest;
use orchestrator::client::{Client, Pretty};
use orchestrator::duration::HumanDuration;
use orchestrator::taskfile::TimeoutsSpec;
use orchestrator::{OrchestratorConfig, Progress, StoreLocation, TaskFile};
use serde_json::Value;

/// The reference orchestrator: runs task files on distributors, or serves an HTTP API.
#[derive(Debug, Parser)]
#[command(name = "orchestrator", version, about)]
struct Cli {
    /// Config file with `[distributors.<name>]` tables and optional `[engine]` and `[store]`.
    /// Default: one `local` distributor and SQLite, both under ./.distributor/
    #[arg(long, global = true, env = "ORCHESTRATOR_CONFIG")]
    config: Option<PathBuf>,
    /// The server the client commands talk to.
    #[arg(
        long,
        global = true,
        env = "ORCHESTRATOR_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// File holding the API token the client commands send (default: the `api-token` file in
    /// the config's state directory, `.distributor/api-token`). `ORCHESTRATOR_TOKEN` overrides.
    #[arg(long, global = true, env = "ORCHESTRATOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Submit the tasks of a task file (TOML or JSON), follow them, print a summary. Exits 1 if
    /// any task did not end as expected.
    Run {
        /// The task file.
        file: PathBuf,
        /// How to show progress.
        #[arg(long, value_enum, default_value_t = Progress::Auto)]
        progress: Progress,
    },
    /// Serve the HTTP API (and push endpoint, metrics, status page) until Ctrl-C.
    Serve {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// The store, overriding the config's `[store]`: a `postgres://` URL (several replicas
        /// may serve one database), a SQLite file, or `:memory:`.
        #[arg(long, env = "ORCHESTRATOR_STORE")]
        store: Option<String>,
    },
    /// Submit tasks to a running server: a task file, or one task from flags.
    Submit {
        /// A task file; every task in it is submitted.
        file: Option<PathBuf>,
        /// Distributor of the task given by flags.
        #[arg(long, short, default_value = "local")]
        distributor: String,
        /// Payload (JSON) of the task given by flags.
        #[arg(long, short)]
        payload: Option<String>,
        /// Label `key=value` (repeatable).
        #[arg(long = "label", short)]
        labels: Vec<String>,
        /// Run timeout, such as `30s`.
        #[arg(long)]
        run_timeout: Option<HumanDuration>,
        /// New attempts after a retryable failure.
        #[arg(long, default_value_t = 0)]
        retries: u32,
    },
    /// Show one execution of a running server.
    Status {
        /// Execution id.
        id: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel an execution on a running server.
    Cancel {
        /// Execution id.
        id: u64,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// List executions of a running server.
    List {
        /// Only these states (comma-separated: running,failed,…).
        #[arg(long)]
        state: Option<String>,
        /// Only this distributor.
        #[arg(long)]
        distributor: Option<String>,
        /// Only with this label `key=value` (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a config file or a task file; prints every problem at once.
    Validate {
        /// The file.
        file: PathBuf,
    },
    /// Workflows: run a workflow file and follow it, check one, print the schema.
    Workflow {
        #[command(subcommand)]
        cmd: orchestrator::workflow::WorkflowCmd,
    },
    /// List the registered kinds and their payload fields.
    Kinds {
        /// Print the full config and payload JSON Schemas.
        #[arg(long)]
        json: bool,
    },
    /// Show or change the cutover of a `switch` distributor on a running server.
    Switch {
        #[command(subcommand)]
        action: orchestrator::switch::SwitchCmd,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.cmd, Cmd::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    rt.block_on(async move {
        match main_async(cli).await {
            Ok(code) => code,
            Err(msg) => fail(msg),
        }
    })
}

fn fail(msg: String) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

type CmdResult = Result<ExitCode, String>;

async fn main_async(cli: Cli) -> CmdResult {
    let registry = orchestrator::registry().map_err(|e| e.to_string())?;
    match cli.cmd {
        Cmd::Run { file, progress } => run(&registry, cli.config.as_deref(), &file, progress).await,
        Cmd::Serve { listen, store } => {
            serve(&registry, cli.config.as_deref(), &listen, store.as_deref()).await
        }
        Cmd::Validate { file } => validate(&registry, cli.config.as_deref(), &file).await,
        Cmd::Kinds { json } => kinds(&registry, json),
        Cmd::Workflow { cmd } => {
            orchestrator::workflow::main(&registry, cli.config.as_deref(), cmd).await
        }
        Cmd::Switch { action } => orchestrator::switch::command(&cli.server, action).await,
        Cmd::Submit {
            file,
            distributor,
            payload,
            labels,
            run_timeout,
            retries,
        } => {
            let client = client(
                &registry,
                &cli.server,
                cli.token_file.as_deref(),
                cli.config.as_deref(),
            )?;
            let reqs: Vec<(String, SubmitRequest)> = match (file, payload) {
                (Some(f), None) => {
                    let tasks = TaskFile::load(&f).map_err(|e| e.to_string())?.task;
                    for t in tasks.iter().filter(|t| t.cancel_after.is_some()) {
                        eprintln!(
                            "note: {}: `cancel_after` and `expect` apply only to \
                             `orchestrator run`; use `orchestrator cancel` here",
                            t.name
                        );
                    }
                    tasks
                        .iter()
                        .map(|t| (t.name.clone(), SubmitRequest::from(t)))
                        .collect()
                }
                (None, Some(p)) => {
                    let payload: Value =
                        serde_json::from_str(&p).map_err(|e| format!("--payload: {e}"))?;
                    let req = SubmitRequest {
                        distributor,
                        payload,
                        timeouts: TimeoutsSpec {
                            run: run_timeout,
                            ..TimeoutsSpec::default()
                        },
                        retries,
                        retry_delay: None,
                        labels: parse_labels(&labels)?.into_iter().collect(),
                        request_id: None,
                    };
                    vec![("task".into(), req)]
                }
                _ => return Err("give either a task file or --payload".into()),
            };
            for (name, req) in reqs {
                let s = client
                    .submit(&req)
                    .await
                    .map_err(|e| format!("{name}: {e}"))?;
                println!(
                    "{name}: submitted execution {} ({}{})",
                    s.id, cli.server, s.url
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { id, json } => {
            let client = client(
                &registry,
                &cli.server,
                cli.token_file.as_deref(),
                cli.config.as_deref(),
            )?;
            let v = client.get(id).await.map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", Pretty(&v));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel { id, reason } => {
            let client = client(
                &registry,
                &cli.server,
                cli.token_file.as_deref(),
                cli.config.as_deref(),
            )?;
            let v = client
                .cancel(id, reason.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            println!("execution {id}: {}", v.state);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List {
            state,
            distributor,
            labels,
            limit,
            json,
        } => {
            let client = client(
                &registry,
                &cli.server,
                cli.token_file.as_deref(),
                cli.config.as_deref(),
            )?;
            let mut q: Vec<(&str, String)> = Vec::new();
            q.extend(state.map(|s| ("state", s)));
            q.extend(distributor.map(|d| ("distributor", d)));
            q.extend(labels.into_iter().map(|l| ("label", l)));
            q.extend(limit.map(|l| ("limit", l.to_string())));
            let views = client.list(&q).await.map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&views).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "{:>6}  {:>6}  {:<12} {:<12} {:<7} INFO",
                    "ID", "TASK", "DISTRIBUTOR", "STATE", "ATTEMPT"
                );
                for v in views {
                    println!(
                        "{:>6}  {:>6}  {:<12} {:<12} {:<7} {}",
                        v.id,
                        v.task_id,
                        v.distributor,
                        v.state.to_string(),
                        v.attempt,
                        v.info_url.unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A client of `--server` with the API token: `ORCHESTRATOR_TOKEN`, else `--token-file`, else
/// the config's token file (what `serve` generated) if it exists.
fn client(
    registry: &Registry,
    server: &str,
    token_file: Option<&Path>,
    config: Option<&Path>,
) -> Result<Client, String> {
    let token = match std::env::var("ORCHESTRATOR_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
        _ => {
            let path = match token_file {
                Some(p) => Some(p.to_path_buf()),
                None => OrchestratorConfig::load(registry, config)
                    .ok()
                    .map(|c| c.token_file())
                    .filter(|p| p.exists()),
            };
            match path {
                Some(p) => {
                    Some(orchestrator::security::read_token_file(&p).map_err(|e| e.to_string())?)
                }
                None => None,
            }
        }
    };
    Ok(Client::new(server)
        .map_err(|e| e.to_string())?
        .with_token(token))
}

fn parse_labels(labels: &[String]) -> Result<Vec<(String, String)>, String> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("--label `{l}`: expected key=value"))
        })
        .collect()
}

async fn engine_for(
    registry: &Registry,
    config: &OrchestratorConfig,
    notify: Option<String>,
) -> Result<Engine, String> {
    config
        .engine(registry.clone(), notify)
        .await
        .map_err(|e| format!("cannot start the engine: {e}"))
}

async fn run(
    registry: &Registry,
    config: Option<&Path>,
    file: &Path,
    progress: Progress,
) -> CmdResult {
    let cfg = OrchestratorConfig::load(registry, config).map_err(|e| e.to_string())?;
    let tasks = TaskFile::load(file).map_err(|e| e.to_string())?;
    let engine = engine_for(registry, &cfg, None).await?;
    if let Err(e) = tasks.check(&file.display().to_string(), &engine) {
        engine.shutdown().await;
        return Err(e.to_string());
    }
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let report = orchestrator::run(&engine, &tasks, progress, interrupt).await;
    engine.shutdown().await;
    let report = report.map_err(|e| e.to_string())?;
    println!();
    print!("{}", report.table());
    let _ = std::io::stdout().flush();
    Ok(if !report.unfinished.is_empty() {
        ExitCode::from(130)
    } else if report.all_as_expected() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn serve(
    registry: &Registry,
    config: Option<&Path>,
    listen: &str,
    store: Option<&str>,
) -> CmdResult {
    let mut cfg = OrchestratorConfig::load(registry, config).map_err(|e| e.to_string())?;
    if let Some(s) = store {
        cfg.store = StoreLocation::parse(s);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let setup = cfg.server_setup(addr)?;
    let engine = engine_for(registry, &cfg, Some(format!("http://{addr}/v1/notify"))).await?;
    println!("orchestrator listening on http://{addr}");
    if let Some(path) = &setup.token_file {
        // Not println!: a supervisor that stopped reading stdout must not kill the server.
        let _ = writeln!(
            std::io::stdout(),
            "API token (scope admin) in {}; the client commands read it from there",
            path.display()
        );
    }
    let _ = std::io::stdout().flush();
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!(
            "shutting down; running work keeps running and is re-attached on the next start"
        );
    };
    orchestrator::serve(listener, engine, setup.security, setup.limits, shutdown)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

async fn validate(registry: &Registry, config: Option<&Path>, file: &Path) -> CmdResult {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let is_json = file.extension().is_some_and(|e| e == "json");
    let doc: Result<Value, String> = if is_json {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        toml::from_str(&text).map_err(|e| e.to_string())
    };
    let is_tasks = doc
        .as_ref()
        .is_ok_and(|d| d.is_array() || d.get("task").is_some());
    if !is_tasks {
        OrchestratorConfig::load(registry, Some(file)).map_err(|e| e.to_string())?;
        println!("{}: ok", file.display());
        return Ok(ExitCode::SUCCESS);
    }
    let mut cfg = OrchestratorConfig::load(registry, config).map_err(|e| e.to_string())?;
    cfg.store = StoreLocation::Memory;
    let tasks = TaskFile::load(file).map_err(|e| e.to_string())?;
    let engine = engine_for(registry, &cfg, None).await?;
    let checked = tasks.check(&file.display().to_string(), &engine);
    engine.shutdown().await;
    checked.map_err(|e| e.to_string())?;
    println!("{}: ok ({} tasks)", file.display(), tasks.task.len());
    Ok(ExitCode::SUCCESS)
}

fn kinds(registry: &Registry, json: bool) -> CmdResult {
    if json {
        let all: Vec<Value> = registry
            .kinds()
            .map(|k| {
                serde_json::json!({
                    "kind": k.name(),
                    "config_schema": k.config_schema(),
                    "payload_schema": k.payload_schema(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    for k in registry.kinds() {
        println!("{}", k.name());
        for (what, schema) in [
            ("config", k.config_schema()),
            ("payload", k.payload_schema()),
        ] {
            println!("  {what}:");
            let props = schema.get("properties").and_then(Value::as_object);
            for (name, p) in props.into_iter().flatten() {
                let desc =
                    first_sentence(p.get("description").and_then(Value::as_str).unwrap_or(""));
                println!("    {name:<16} {desc}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The first sentence of a doc comment, on one line.
fn first_sentence(doc: &str) -> String {
    let flat = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut end = flat.len();
    for (i, _) in flat.match_indices(". ") {
        let before = &flat[..i];
        if !(before.ends_with("e.g") || before.ends_with("i.e")) {
            end = i;
            break;
        }
    }
    flat[..end].trim_end_matches('.').to_owned()
}
