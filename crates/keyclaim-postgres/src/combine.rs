//! The claim combiner: claims of concurrent callers share statements.
//!
//! A claim statement costs a round trip and a commit (a WAL flush) whatever
//! the number of its targets (R4.7). So concurrent claims are combined: a
//! claim that finds a free *slot* (at most
//! [`PostgresOptions::claim_batches_in_flight`] batches run at once) and
//! nobody waiting runs at once, alone, on the caller's task: one client
//! pays nothing for the combiner. Otherwise it joins the queue; when a slot
//! frees, a task takes what queued up meanwhile, in arrival order, up to
//! [`PostgresOptions::claim_batch_targets`] targets, and runs it as one
//! claim statement ([`ops::claim_many`], which merges targets of the same
//! device and hands out their keys in arrival order, R4.2), then answers
//! each caller its own part. Batches thus grow with the load, and the
//! combiner never waits for company.
//!
//! - *A failing batch fails nobody else*: when the statement fails (nothing
//!   was applied), a batch of several claims runs again one claim at a
//!   time, so only a claim that fails on its own gets an error; a key that
//!   does not decode fails only the claims of its (device, algorithm)
//!   (R10.7).
//! - *Abandoned claims* (R10.6): a queued claim whose caller has gone away
//!   (its future dropped, so its answer's receiver is closed) is dropped
//!   when its batch is formed, and checked again once the batch holds its
//!   connection, right before the statement: its keys are never used up
//!   for nobody. A claim whose caller goes away later is applied (R4.2),
//!   and its changes are still announced (R11.1, R11.2).
//! - *Bounded*: at most [`PostgresOptions::claim_queue_limit`] claims wait;
//!   past that a claim fails at once with a retryable error (R10.6).
//! - *Off* ([`PostgresOptions::claim_batching`]): slots are unbounded, so
//!   every claim runs at once, alone.
//! - *Large claims go alone*: a claim of more targets than a batch holds
//!   runs at once on its own connection, outside the slots, so that it
//!   neither queues behind small claims nor delays them; on keyclaim's own
//!   pool it does not queue behind other operations for that connection
//!   either. Claims borrow that connection only while no large claim runs;
//!   a large claim that starts meanwhile waits for the first connection to
//!   come back (see [`Connections`]).
//!
//! [`PostgresOptions::claim_batching`]: crate::PostgresOptions::claim_batching
//! [`PostgresOptions::claim_batches_in_flight`]: crate::PostgresOptions::claim_batches_in_flight
//! [`PostgresOptions::claim_batch_targets`]: crate::PostgresOptions::claim_batch_targets
//! [`PostgresOptions::claim_queue_limit`]: crate::PostgresOptions::claim_queue_limit

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keyclaim::backend::StoreCore;
use keyclaim::{ClaimOutcome, ClaimTarget, Result};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::PostgresOptions;
use crate::error;
use crate::listen::Announcer;
use crate::ops::{self, ClaimRequest, Sql};
use crate::session::{Conn, Connections};

/// The combiner's settings (see [`crate::PostgresOptions`], whose setters
/// keep the batch size and the batches in flight at least 1).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// The most targets in one batch; larger claims run alone.
    pub(crate) batch_targets: usize,
    /// The most batches (or lone claims) running at once.
    pub(crate) in_flight: usize,
    /// The most claims waiting for a batch.
    pub(crate) queue_limit: usize,
}

impl Settings {
    /// The settings of `options`; with batching off, every claim runs at
    /// once (no bound on slots, so none ever waits).
    pub(crate) fn of(options: &PostgresOptions) -> Self {
        let batching = options.get_claim_batching();
        Self {
            batch_targets: options.get_claim_batch_targets(),
            in_flight: if batching {
                options.get_claim_batches_in_flight()
            } else {
                usize::MAX
            },
            queue_limit: options.get_claim_queue_limit(),
        }
    }
}

/// A store's claim combiner (see the module docs).
#[derive(Debug)]
pub(crate) struct Combiner {
    shared: Arc<Shared>,
}

/// What the store's callers and the batch tasks share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    settings: Settings,
    connections: Connections,
    sql: Sql,
    core: StoreCore,
    announcer: Option<Arc<Announcer>>,
    runtime: Handle,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Job>,
    /// Slots taken: batches and lone claims running.
    running: usize,
}

/// A queued claim.
#[derive(Debug)]
struct Job {
    targets: Box<[ClaimTarget]>,
    fall_back: bool,
    reply: oneshot::Sender<Result<ClaimOutcome>>,
}

impl Job {
    /// Whether its caller has gone away (R10.6).
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// A taken slot; dropping it hands it to a new batch task when claims are
/// waiting, else frees it. (A drop, so that a lone claim whose caller goes
/// away, or a batch task that panics, still gives its slot back.)
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.0.state();
        if state.queue.is_empty() {
            state.running -= 1;
        } else {
            drop(state);
            let shared = self.0.clone();
            self.0.runtime.spawn(run_batches(Slot(shared)));
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock left a valid queue behind.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A pooled connection, or a retryable error.
    async fn client(&self, op: &'static str) -> Result<Conn> {
        self.connections.get_for_claims(op).await
    }

    /// Takes the next batch: waiting claims in arrival order, the
    /// abandoned ones dropped, up to the batch's target bound (at least one
    /// claim: none queued is larger).
    fn take_batch(&self) -> Vec<Job> {
        let mut state = self.state();
        let mut batch: Vec<Job> = Vec::new();
        let mut targets = 0;
        while let Some(job) = state.queue.front() {
            if job.abandoned() {
                state.queue.pop_front();
                continue;
            }
            let n = job.targets.len();
            if !batch.is_empty() && targets + n > self.settings.batch_targets {
                break;
            }
            targets += n;
            batch.extend(state.queue.pop_front());
        }
        batch
    }

    /// Runs one batch and answers its claims.
    async fn run_batch(&self, mut batch: Vec<Job>) {
        let op = "claim";
        let mut client = match self.client(op).await {
            Ok(client) => client,
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(error::copy_of(op, &e)));
                }
                return;
            }
        };
        // Getting the connection may have taken a while (R10.6).
        batch.retain(|job| !job.abandoned());
        if batch.is_empty() {
            return;
        }
        let requests: Vec<ClaimRequest<'_>> = batch
            .iter()
            .map(|job| ClaimRequest {
                targets: &job.targets,
                fall_back: job.fall_back,
            })
            .collect();
        let limits = self.core.limits();
        let answers = ops::claim_many(&mut client, &self.sql, limits, &requests).await;
        drop(requests);
        tracing::debug!(
            claims = batch.len(),
            ok = answers.is_ok(),
            "claim batch done"
        );
        match answers {
            Ok(answers) => {
                for (job, answer) in batch.into_iter().zip(answers) {
                    self.reply(job, answer);
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(job) = batch.pop() {
                    let _ = job.reply.send(Err(e));
                }
            }
            Err(e) => {
                // Nothing was applied: run each claim alone, so that only
                // one failing on its own fails.
                tracing::debug!(%e, claims = batch.len(), "claim batch failed; claims run alone");
                for job in batch {
                    if job.abandoned() {
                        continue;
                    }
                    if client.is_closed() {
                        client = match self.client(op).await {
                            Ok(client) => client,
                            Err(e) => {
                                let _ = job.reply.send(Err(e));
                                continue;
                            }
                        };
                    }
                    let answer =
                        ops::claim(&mut client, &self.sql, limits, &job.targets, job.fall_back)
                            .await;
                    self.reply(job, answer);
                }
            }
        }
    }

    /// Sends a claim its answer; if its caller has gone away after the
    /// claim was applied, announces its changes in its stead (R11.1, R11.2).
    fn reply(&self, job: Job, answer: Result<ClaimOutcome>) {
        if let Err(Ok(outcome)) = job.reply.send(answer) {
            if let Some(announcer) = &self.announcer {
                announcer.announce(&outcome.changes);
            }
            self.core.announce_remote(&outcome.changes);
        }
    }
}

/// A batch task: runs batches while claims wait, then frees its slot.
async fn run_batches(slot: Slot) {
    loop {
        // Let the callers just answered run first: those that claim again
        // at once join the next batch instead of waiting for a later one.
        tokio::task::yield_now().await;
        let batch = slot.0.take_batch();
        if batch.is_empty() {
            return;
        }
        slot.0.run_batch(batch).await;
    }
}

impl Combiner {
    /// A combiner running claims on `connections` (see the module docs).
    pub(crate) fn new(
        settings: Settings,
        connections: Connections,
        sql: Sql,
        core: StoreCore,
        announcer: Option<Arc<Announcer>>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                settings,
                connections,
                sql,
                core,
                announcer,
                runtime: Handle::current(),
            }),
        }
    }

    /// Whether claims are batched.
    pub(crate) fn batching(&self) -> bool {
        self.shared.settings.in_flight != usize::MAX
    }

    /// The number of claims waiting for a batch.
    pub(crate) fn queued(&self) -> usize {
        self.shared.state().queue.len()
    }

    /// Claims for `targets`: at once when a slot is free and nobody waits
    /// (or when the claim is larger than a batch), else in a batch.
    pub(crate) async fn claim(
        &self,
        op: &'static str,
        targets: &[ClaimTarget],
        fall_back: bool,
    ) -> Result<ClaimOutcome> {
        let shared = &self.shared;
        if targets.len() > shared.settings.batch_targets {
            return self.alone(op, targets, fall_back, true).await;
        }
        let queued = {
            let mut state = shared.state();
            if state.running < shared.settings.in_flight && state.queue.is_empty() {
                state.running += 1;
                None
            } else if state.queue.len() >= shared.settings.queue_limit {
                tracing::warn!(
                    waiting = state.queue.len(),
                    "keyclaim claims back up; refusing a claim"
                );
                return Err(error::claims_queued(op));
            } else {
                let (reply, rx) = oneshot::channel();
                state.queue.push_back(Job {
                    targets: targets.into(),
                    fall_back,
                    reply,
                });
                let spawn = state.running < shared.settings.in_flight;
                if spawn {
                    state.running += 1;
                }
                Some((rx, spawn))
            }
        };
        let Some((rx, spawn)) = queued else {
            // Nothing to combine with: run at once in the free slot.
            let _slot = Slot(shared.clone());
            return self.alone(op, targets, fall_back, false).await;
        };
        if spawn {
            shared.runtime.spawn(run_batches(Slot(shared.clone())));
        }
        rx.await.map_err(|_| error::batch_lost(op))?
    }

    /// Runs one claim by itself on a connection of its own; a `large`
    /// one on the connection kept for large claims (see
    /// [`Connections`]).
    async fn alone(
        &self,
        op: &'static str,
        targets: &[ClaimTarget],
        fall_back: bool,
        large: bool,
    ) -> Result<ClaimOutcome> {
        let shared = &self.shared;
        let mut client = if large {
            shared.connections.get_for_large_claim(op).await?
        } else {
            shared.client(op).await?
        };
        ops::claim(
            &mut client,
            &shared.sql,
            shared.core.limits(),
            targets,
            fall_back,
        )
        .await
    }
}
