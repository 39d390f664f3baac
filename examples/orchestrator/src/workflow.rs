//! `orchestrator workflow …`: run a workflow file here and follow it, or check one.
//!
//! `orchestrator workflow run FILE --param k=v` starts the run on this process's engine (the
//! config's store, SQLite by default), prints each step change, asks on standard input when a
//! step awaits approval (`--approve` approves every such step), and ends with a summary. Exit
//! code: 0 when the run succeeded, 1 when it failed, 130 when it was cancelled (Ctrl-C cancels
//! the run), 2 on errors before it started. Unfinished runs in the store are resumed by any
//! later `workflow run` or `serve` on the same store.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use distributor_core::Registry;
use distributor_workflow::{
    RunId, RunSnapshot, RunState, StepState, WorkflowEvent, WorkflowSpec, Workflows,
};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::sync::broadcast::error::RecvError;

use crate::OrchestratorConfig;

/// The `workflow` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum WorkflowCmd {
    /// Run a workflow file (TOML or JSON) and follow it to the end.
    Run {
        /// The workflow file.
        file: PathBuf,
        /// Parameter `name=value` (repeatable); the value is JSON if it parses, else a string.
        #[arg(long = "param", short)]
        params: Vec<String>,
        /// Approve every approval step without asking.
        #[arg(long)]
        approve: bool,
    },
    /// Resume the unfinished runs in the store (after a crash) and follow one to the end: the
    /// given run, else the newest unfinished one.
    Resume {
        /// The run id.
        run: Option<String>,
        /// Approve every approval step without asking.
        #[arg(long)]
        approve: bool,
    },
    /// Check a workflow file; prints every problem with its JSON Pointer.
    Validate {
        /// The workflow file.
        file: PathBuf,
    },
    /// Print the JSON Schema of workflow files.
    Schema,
}

/// Parses `name=value` parameters (the value as JSON when it parses, else as a string).
pub fn parse_params(params: &[String]) -> Result<BTreeMap<String, Value>, String> {
    params
        .iter()
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| format!("--param `{p}`: expected name=value"))?;
            let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
            Ok((k.to_owned(), v))
        })
        .collect()
}

/// Runs a `workflow` subcommand.
pub async fn main(
    registry: &Registry,
    config: Option<&Path>,
    cmd: WorkflowCmd,
) -> Result<ExitCode, String> {
    match cmd {
        WorkflowCmd::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&WorkflowSpec::schema()).map_err(|e| e.to_string())?
            );
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCmd::Validate { file } => {
            let spec = WorkflowSpec::load(&file).map_err(|e| e.to_string())?;
            println!("{}: ok ({} steps)", file.display(), spec.steps.len());
            Ok(ExitCode::SUCCESS)
        }
        WorkflowCmd::Run {
            file,
            params,
            approve,
        } => run(registry, config, &file, &params, approve).await,
        WorkflowCmd::Resume { run, approve } => resume(registry, config, run, approve).await,
    }
}

async fn resume(
    registry: &Registry,
    config: Option<&Path>,
    run: Option<String>,
    approve: bool,
) -> Result<ExitCode, String> {
    let cfg = OrchestratorConfig::load(registry, config).map_err(|e| e.to_string())?;
    let engine = cfg
        .engine(registry.clone(), None)
        .await
        .map_err(|e| format!("cannot start the engine: {e}"))?;
    let workflows = Workflows::open(engine.clone())
        .await
        .map_err(|e| e.to_string())?;
    let mut events = workflows.subscribe();
    let id = match run {
        Some(r) => RunId(r),
        None => match workflows
            .list()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|r| !r.state.is_terminal())
        {
            Some(r) => r.id,
            None => {
                engine.shutdown().await;
                println!("no unfinished workflow run");
                return Ok(ExitCode::SUCCESS);
            }
        },
    };
    let snap = workflows.get(&id).await.map_err(|e| e.to_string())?;
    println!("run {id} resumed ({})", snap.run.state.as_str());
    let result = if snap.run.state.is_terminal() {
        Ok(snap)
    } else {
        // An approval that was already waiting before the restart is asked for again.
        for (name, d) in &snap.steps {
            if d.state == StepState::AwaitingApproval {
                let _ = ask_approval(&workflows, &id, name, approve).await;
            }
        }
        follow(&workflows, &id, &mut events, approve).await
    };
    engine.shutdown().await;
    let snap = result?;
    print!("{}", summary(&snap));
    let _ = std::io::stdout().flush();
    Ok(exit_code(snap.run.state))
}

fn exit_code(state: RunState) -> ExitCode {
    match state {
        RunState::Succeeded => ExitCode::SUCCESS,
        RunState::Cancelled => ExitCode::from(130),
        _ => ExitCode::FAILURE,
    }
}

/// Asks on standard input (or approves with `--approve`); a "no" cancels the run.
async fn ask_approval(
    workflows: &Workflows,
    id: &RunId,
    step: &str,
    approve: bool,
) -> Result<(), String> {
    let snap = workflows.get(id).await.map_err(|e| e.to_string())?;
    let prompt = snap
        .run
        .spec
        .step(step)
        .and_then(|s| s.approval.as_ref())
        .and_then(|a| a.prompt.clone())
        .unwrap_or_else(|| format!("Approve {step}?"));
    let yes = if approve {
        println!("  {step}: approved (--approve)");
        true
    } else {
        print!("  {prompt} [y/N] ");
        let _ = std::io::stdout().flush();
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let line = stdin.next_line().await.ok().flatten().unwrap_or_default();
        matches!(line.trim(), "y" | "Y" | "yes")
    };
    if yes {
        let by = std::env::var("USER").unwrap_or_else(|_| "cli".into());
        workflows
            .approve(id, step, &by)
            .await
            .map_err(|e| e.to_string())
    } else {
        println!("  {step}: not approved; cancelling the run");
        workflows.cancel(id).await.map_err(|e| e.to_string())
    }
}

async fn run(
    registry: &Registry,
    config: Option<&Path>,
    file: &Path,
    params: &[String],
    approve: bool,
) -> Result<ExitCode, String> {
    let cfg = OrchestratorConfig::load(registry, config).map_err(|e| e.to_string())?;
    let spec = WorkflowSpec::load(file).map_err(|e| e.to_string())?;
    let params = parse_params(params)?;
    let engine = cfg
        .engine(registry.clone(), None)
        .await
        .map_err(|e| format!("cannot start the engine: {e}"))?;
    let workflows = Workflows::open(engine.clone())
        .await
        .map_err(|e| e.to_string())?;
    let mut events = workflows.subscribe();
    let id = match workflows.start(spec, params).await {
        Ok(id) => id,
        Err(e) => {
            engine.shutdown().await;
            return Err(e.to_string());
        }
    };
    println!("run {id} started");
    let result = follow(&workflows, &id, &mut events, approve).await;
    engine.shutdown().await;
    let snap = result?;
    print!("{}", summary(&snap));
    let _ = std::io::stdout().flush();
    Ok(exit_code(snap.run.state))
}

async fn follow(
    workflows: &Workflows,
    id: &RunId,
    events: &mut tokio::sync::broadcast::Receiver<WorkflowEvent>,
    approve: bool,
) -> Result<RunSnapshot, String> {
    let mut interrupted = false;
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                eprintln!("interrupted: cancelling run {id}");
                workflows.cancel(id).await.map_err(|e| e.to_string())?;
                continue;
            }
        };
        match ev {
            Ok(WorkflowEvent::StepChanged {
                run, step, state, ..
            }) if &run == id => {
                println!("  {step}: {}", state.as_str().replace('_', " "));
                if state == StepState::AwaitingApproval {
                    ask_approval(workflows, id, &step, approve).await?;
                }
            }
            Ok(WorkflowEvent::Finished { run, .. }) if &run == id => {
                return workflows.get(id).await.map_err(|e| e.to_string());
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                let snap = workflows.get(id).await.map_err(|e| e.to_string())?;
                if snap.run.state.is_terminal() {
                    return Ok(snap);
                }
            }
            Err(RecvError::Closed) => return Err("the workflow manager stopped".into()),
        }
    }
}

/// The summary table printed at the end of a run.
pub fn summary(snap: &RunSnapshot) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nrun {} ({}): {}",
        snap.run.id,
        snap.run.spec.name,
        snap.run.state.as_str()
    );
    let _ = writeln!(
        out,
        "{:<20} {:<18} {:>6} {:>10}  ERROR",
        "STEP", "STATE", "TASKS", "TIME"
    );
    for name in snap.run.spec.topological() {
        let d = &snap.steps[name];
        let time = match (d.started_at, d.finished_at) {
            (Some(s), Some(f)) => crate::duration::elapsed(s.until(f)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<18} {:>6} {:>10}  {}",
            name,
            d.state.as_str(),
            d.units,
            time,
            d.error.as_deref().unwrap_or("")
        );
    }
    out
}
