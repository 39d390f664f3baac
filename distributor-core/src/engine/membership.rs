//! The membership task of an engine instance on a shared store ([`SharedStore`]): heartbeats
//! its leases, hands shards over when instances join or leave, takes over shards whose owner
//! died, and applies the commands other instances queued for its executions.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Cmd;
use super::actor::ShardChange;
use crate::error::Error;
use crate::store::{ShardId, SharedStore};

/// How often the inbox is read when no NOTIFY arrives (a missed one only delays this much).
const INBOX_POLL: Duration = Duration::from_secs(1);

/// Tells the actor about a shard change and waits until it has acted on it. False if the
/// actor is gone.
async fn tell(cmd: &mpsc::UnboundedSender<Cmd>, change: ShardChange) -> bool {
    let (tx, rx) = oneshot::channel();
    cmd.send(Cmd::Shards(change, tx)).is_ok() && rx.await.is_ok()
}

/// Applies a lease round's outcome: lost shards are dropped at once, excess ones committed,
/// dropped and released, gained ones loaded and recovered.
pub(crate) async fn apply_round(
    shared: &dyn SharedStore,
    cmd: &mpsc::UnboundedSender<Cmd>,
    round: crate::store::LeaseRound,
) -> bool {
    if !round.lost.is_empty()
        && !tell(
            cmd,
            ShardChange::Drop {
                shards: round.lost,
                graceful: false,
            },
        )
        .await
    {
        return false;
    }
    if !round.excess.is_empty() {
        if !tell(
            cmd,
            ShardChange::Drop {
                shards: round.excess.clone(),
                graceful: true,
            },
        )
        .await
        {
            return false;
        }
        if let Err(e) = shared.release(&round.excess).await {
            tracing::warn!(error = %e, "could not release shards; their leases will expire");
        }
    }
    if !round.gained.is_empty() && !tell(cmd, ShardChange::Gain(round.gained)).await {
        return false;
    }
    true
}

/// Runs until the actor stops (graceful shutdown or the engine dropped).
pub(crate) async fn run(shared: std::sync::Arc<dyn SharedStore>, cmd: mpsc::UnboundedSender<Cmd>) {
    let interval = shared.round_interval();
    let ttl = shared.lease_ttl();
    let mut next_round = tokio::time::Instant::now() + interval;
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        let wait = next_round
            .saturating_duration_since(tokio::time::Instant::now())
            .min(INBOX_POLL);
        let membership_changed = tokio::select! {
            _ = cmd.closed() => return,
            m = shared.wakeup(wait) => m,
        };
        let now = tokio::time::Instant::now();
        if now >= next_round || membership_changed {
            next_round = now + interval;
            match shared.round().await {
                Ok(round) => {
                    last_renewed = now;
                    if !apply_round(&*shared, &cmd, round).await {
                        return;
                    }
                }
                Err(e) if now.duration_since(last_renewed) >= ttl => {
                    // The leases may have been taken over by now: stop acting on them (their
                    // writes would be fenced off anyway).
                    let all = shared.held();
                    tracing::error!(error = %e, shards = ?all, "leases not renewed within their lifetime; dropping every shard");
                    if !tell(
                        &cmd,
                        ShardChange::Drop {
                            shards: all.clone(),
                            graceful: false,
                        },
                    )
                    .await
                    {
                        return;
                    }
                    let _ = shared.release(&all).await;
                }
                Err(e) => tracing::warn!(error = %e, "lease round failed; retrying"),
            }
        }
        if !drain_inbox(&*shared, &cmd).await {
            return;
        }
    }
}

/// Applies the queued commands for this instance's shards, and removes those applied (or
/// refused for good). False if the actor is gone.
async fn drain_inbox(shared: &dyn SharedStore, cmd: &mpsc::UnboundedSender<Cmd>) -> bool {
    let held: Vec<ShardId> = shared.held();
    if held.is_empty() {
        return true;
    }
    let rows = match shared.inbox(&held).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the inbox; retrying");
            return true;
        }
    };
    if rows.is_empty() {
        return true;
    }
    let mut waits = Vec::with_capacity(rows.len());
    for (row, id, routed) in rows {
        let (tx, rx) = oneshot::channel();
        if cmd.send(Cmd::Inbox(id, routed, tx)).is_err() {
            return false;
        }
        waits.push((row, rx));
    }
    let mut done = Vec::new();
    for (row, rx) in waits {
        match rx.await {
            // Not this instance's (any more): stays queued for the owner.
            Ok(Err(Error::Fenced { .. })) => {}
            // Not committed (a store failure): tried again on the next pass.
            Ok(Err(Error::Store { .. })) => {}
            Ok(r) => {
                if let Err(e) = r {
                    tracing::debug!(row, error = %e, "queued command refused");
                }
                done.push(row);
            }
            Err(_) => return false,
        }
    }
    if let Err(e) = shared.ack(&done).await {
        tracing::warn!(error = %e, "cannot remove applied commands; they will be applied again (harmless)");
    }
    true
}
