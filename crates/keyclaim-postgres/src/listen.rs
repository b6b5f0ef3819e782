//! Change notifications across processes (R11.1).
//!
//! Every change is announced with `pg_notify(<channel>, '<instance>
//! <devices>')` on its schema's channel, and each store handle keeps one
//! dedicated connection that `LISTEN`s there ([`Listener`]) and forwards
//! other handles' events to its subscribers ([`StoreCore::announce_remote`]).
//!
//! **When announcements are sent.** PostgreSQL serializes the commits of
//! all transactions that `NOTIFY` in a database (they take one
//! database-wide lock at commit, to keep the queue in commit order). Sent
//! from inside every claim, that lock capped claim throughput at a fraction
//! of what the claims themselves allow (measured: about 5x fewer claims/s
//! with 8 to 64 concurrent claimers on distinct devices). So by default an
//! [`Announcer`] task sends them right after the commits, batched: it
//! gathers for [`GATHER`] after a change, and while one batch is being
//! sent, the next one gathers. The price: a process
//! that dies between a commit and its announcement leaves the other
//! workers unwoken for that change (they see it at their next read).
//! [`crate::PostgresOptions::transactional_notify`] restores sending inside
//! each mutating transaction (delivered exactly when the change commits).
//!
//! **Bounded** (R10.6). The devices waiting to be announced are one set (a
//! device changed many times waits once), of at most
//! [`MAX_BACKLOG_DEVICES`]: when the announcer cannot keep up (the server
//! is slow, the pool exhausted), mutations are refused at once with a
//! retryable error, before anything is applied, until it has caught up. A
//! batch whose sending fails is logged and dropped, like the announcements
//! of a process that dies.
//!
//! A handle skips its own notifications: it has already told its
//! subscribers, right after the commit, with the exact [`Changes`] of the
//! operation. Events of other handles arrive as one [`Changes`] per
//! notification (a change of very many devices arrives in several).
//!
//! The listener reconnects when its connection is lost (with a growing
//! pause, at most [`MAX_BACKOFF`]). Notifications sent while it was away
//! are lost: once it listens again, it tells the subscribers so with one
//! [`Changes::unknown`] event, and they re-read what they watch (R11.3), as
//! on [`broadcast::error::RecvError::Lagged`].
//!
//! [`broadcast::error::RecvError::Lagged`]: keyclaim::broadcast::error::RecvError::Lagged

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt as _;
use keyclaim::backend::StoreCore;
use keyclaim::{Changes, Device, Error, Result};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Notification};
use tracing::Instrument as _;

use crate::error::{self, pg};
use crate::ops::{ANNOUNCE, notify_payloads};
use crate::tls::Connector;

/// How long the announcer gathers changes before it sends them.
pub(crate) const GATHER: Duration = Duration::from_millis(10);

/// The most devices one announcement transaction sends.
const MAX_BATCH_DEVICES: usize = 10_000;

/// The most devices waiting to be announced (R10.6): past it,
/// [`Announcer::room`] fails, so that mutations fail at once with a
/// retryable error instead of piling up announcements while the announcer
/// cannot send (the server is slow, the pool is exhausted). About 10 MiB
/// with long IDs.
pub(crate) const MAX_BACKLOG_DEVICES: usize = 100_000;

/// Sends this handle's announcements after commits, batched (see the
/// module docs). The devices waiting are one set, so a device changed many
/// times waits once (coalesced). Dropping it lets the task send what is
/// waiting and end.
#[derive(Debug)]
pub(crate) struct Announcer {
    shared: Arc<Backlog>,
}

/// What the store and the announcer task share.
#[derive(Debug)]
struct Backlog {
    devices: Mutex<BTreeSet<Device>>,
    max: usize,
    wake: Notify,
    closed: AtomicBool,
}

impl Backlog {
    fn devices(&self) -> MutexGuard<'_, BTreeSet<Device>> {
        // A panic while holding the lock left a valid set behind.
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Announcer {
    /// Starts the sending task on the store's pool, with room for `max`
    /// devices waiting ([`MAX_BACKLOG_DEVICES`]).
    pub(crate) fn start(pool: Pool, channel: String, instance: String, max: usize) -> Self {
        let shared = Arc::new(Backlog {
            devices: Mutex::new(BTreeSet::new()),
            max,
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let span = tracing::debug_span!("keyclaim.postgres.announcer", %channel);
        tokio::spawn(announce(pool, channel, instance, shared.clone()).instrument(span));
        Self { shared }
    }

    /// Fails with a retryable error when the backlog is full (R10.6): the
    /// caller, about to mutate, must not add to it. A mutation let through
    /// adds its devices whatever their number, so the backlog holds at most
    /// the bound plus what the mutations in flight change (at most one per
    /// pooled connection).
    pub(crate) fn room(&self, op: &'static str) -> Result<()> {
        let waiting = self.shared.devices().len();
        if waiting >= self.shared.max {
            tracing::warn!(
                waiting,
                "keyclaim change announcements back up; refusing a write"
            );
            return Err(error::backlog(op));
        }
        Ok(())
    }

    /// Queues a committed change for the other workers. Never blocks.
    pub(crate) fn announce(&self, changes: &Changes) {
        if changes.is_empty() {
            return;
        }
        self.shared
            .devices()
            .extend(changes.devices().iter().cloned());
        self.shared.wake.notify_one();
    }
}

#[cfg(test)]
impl Announcer {
    /// How many devices wait to be announced.
    fn waiting(&self) -> usize {
        self.shared.devices().len()
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

async fn announce(pool: Pool, channel: String, instance: String, shared: Arc<Backlog>) {
    loop {
        if shared.devices().is_empty() {
            if shared.closed.load(Ordering::SeqCst) {
                return;
            }
            shared.wake.notified().await;
            continue;
        }
        // Gather a little: each NOTIFY transaction costs the server a
        // commit and wakes every listener, so a busy store sends at most
        // about one per GATHER.
        tokio::time::sleep(GATHER).await;
        let batch: Vec<Device> = {
            let mut waiting = shared.devices();
            let rest = match waiting.iter().nth(MAX_BATCH_DEVICES) {
                Some(first_of_rest) => {
                    let first_of_rest = first_of_rest.clone();
                    waiting.split_off(&first_of_rest)
                }
                None => BTreeSet::new(),
            };
            std::mem::replace(&mut *waiting, rest).into_iter().collect()
        };
        let payloads = notify_payloads(&instance, &batch);
        let sent = async {
            let client = pool.get().await.map_err(|e| error::pool("announce", e))?;
            let stmt = client
                .prepare_cached(ANNOUNCE)
                .await
                .map_err(pg("announce"))?;
            client
                .query(&stmt, &[&channel, &payloads])
                .await
                .map_err(pg("announce"))?;
            Ok::<(), Error>(())
        };
        if let Err(error) = sent.await {
            tracing::warn!(%error, devices = batch.len(), "could not announce keyclaim changes to other workers");
        }
    }
}

/// The longest pause between two reconnection attempts.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The background task; dropping this stops it.
#[derive(Debug)]
pub(crate) struct Listener {
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Connects, starts listening, and returns once the first `LISTEN` is in
    /// place (so that a change committed after `connect` returned is seen).
    pub(crate) async fn start(
        mut config: tokio_postgres::Config,
        tls: Connector,
        channel: String,
        instance: String,
        core: StoreCore,
        timeout: Duration,
    ) -> Result<Self> {
        // Detect a silently dead TCP peer within about a minute.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        // Built once per store from a validated schema name.
        let listen_sql = format!("LISTEN {channel}");
        let (ready_tx, ready_rx) = oneshot::channel();
        let span = tracing::debug_span!("keyclaim.postgres.listener", %channel);
        let task =
            tokio::spawn(run(config, tls, listen_sql, instance, core, ready_tx).instrument(span));
        let listener = Self { task };
        match tokio::time::timeout(timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(listener),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(error::listener("listener task ended")),
            Err(_) => Err(error::listener(
                "timed out starting the notification listener",
            )),
        }
    }
}

async fn run(
    config: tokio_postgres::Config,
    tls: Connector,
    listen_sql: String,
    instance: String,
    core: StoreCore,
    ready: oneshot::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    loop {
        let outcome = listen_once(&config, &tls, &listen_sql, &instance, &core, &mut ready).await;
        match outcome {
            Ok(()) => tracing::warn!("keyclaim notification connection closed; reconnecting"),
            Err(error) => {
                if let Some(ready) = ready.take() {
                    // The first attempt failed: connect reports it.
                    let _ = ready.send(Err(error));
                    return;
                }
                tracing::warn!(%error, "keyclaim notification connection failed; reconnecting");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if ready.is_none() && backoff == MAX_BACKOFF {
            tracing::debug!("keyclaim notification listener retrying");
        }
    }
}

/// One connection's life: connect, `LISTEN`, forward until it ends.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &Connector,
    listen_sql: &str,
    instance: &str,
    core: &StoreCore,
    ready: &mut Option<oneshot::Sender<Result<()>>>,
) -> Result<()> {
    let (client, mut connection) = config.connect(tls.clone()).await.map_err(pg("listen"))?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let listen = client.batch_execute(listen_sql);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            done = &mut listen, if !listening => {
                done.map_err(pg("listen"))?;
                listening = true;
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                } else {
                    // Listening again after a lost connection: what other
                    // processes changed meanwhile was not heard (R11.3).
                    core.announce_missed();
                }
                tracing::debug!("keyclaim notification listener ready");
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => forward(&n, instance, core),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(pg("listen")(e)),
                None => return Ok(()),
            },
        }
    }
}

/// Forwards one notification of another handle to the subscribers.
fn forward(notification: &Notification, instance: &str, core: &StoreCore) {
    let payload = notification.payload();
    if payload
        .split_once(' ')
        .is_some_and(|(sender, _)| sender == instance)
    {
        return; // our own: already told our subscribers
    }
    match parse_payload(payload) {
        Some((_, devices)) => core.announce_remote(&Changes::from_devices(devices)),
        None => tracing::warn!("ignoring a malformed keyclaim notification"),
    }
}

/// Parses `<instance> <JSON array of [user ID, device ID]>`.
pub(crate) fn parse_payload(payload: &str) -> Option<(&str, Vec<Device>)> {
    let (sender, json) = payload.split_once(' ')?;
    let pairs: Vec<(String, String)> = serde_json::from_str(json).ok()?;
    let devices = pairs
        .iter()
        .filter_map(|(user, device)| Device::parse(user, device).ok())
        .collect();
    Some((sender, devices))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};

    use super::*;

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 30 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn changes(from: usize, to: usize) -> Changes {
        Changes::from_devices((from..to).map(|i| Device::parse(&format!("@u{i}:x"), "D").unwrap()))
    }

    /// R10.6: while the announcer cannot send (its server accepts the
    /// connection and never answers), the devices waiting stay one set
    /// (a device changed again waits once) and, past the bound, mutations
    /// are refused with a retryable error instead of piling up more.
    #[tokio::test]
    async fn the_backlog_is_bounded_while_the_announcer_cannot_send() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = server.accept().await {
                held.push(socket); // open, silent
            }
        });
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("nobody")
            .dbname("none");
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(1)
            .runtime(Runtime::Tokio1)
            .build()
            .unwrap();
        let announcer = Announcer::start(pool, "chan".into(), "inst".into(), 100);
        assert!(announcer.room("test").is_ok());

        // The first batch is taken, and its sending hangs.
        announcer.announce(&changes(0, 10));
        wait_until("the first batch is taken", || announcer.waiting() == 0).await;

        // Changed again and again: each device waits once.
        for _ in 0..20 {
            announcer.announce(&changes(0, 60));
        }
        assert_eq!(announcer.waiting(), 60);
        assert!(announcer.room("test").is_ok());
        // Past the bound, writes are refused, retryably.
        announcer.announce(&changes(60, 130));
        assert_eq!(announcer.waiting(), 130);
        let err = announcer.room("claim").expect_err("backlog full");
        assert!(err.is_retryable(), "{err:?}");
        assert!(matches!(err, Error::Storage { op: "claim", .. }), "{err:?}");
    }

    #[test]
    fn payloads_parse() {
        let (sender, devices) = parse_payload(r#"abc [["@a:x","D1"],["@b:x","D 2"]]"#).unwrap();
        assert_eq!(sender, "abc");
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[1].device_id.as_str(), "D 2");
        assert!(parse_payload("nonsense").is_none());
    }
}
