//! When the writer commits durably: every batch in the durable mode; in
//! relaxed mode ([`RedbDurability::Relaxed`]) a batch is committed without
//! an fsync, and the commits become durable at least every `flush_every`.
//!
//! [`FlushClock`] keeps relaxed mode's promise:
//!
//! - the clock runs from the oldest commit that is not yet durable, and only
//!   a commit that really reached the disk durably stops it. A batch that
//!   wrote nothing commits nothing, so when a flush is due it is committed
//!   anyway, as an empty durable commit ([`Commit::Flush`]): its callers
//!   wait for the flush and get its error;
//! - a flush that fails is tried again after a back-off (10 ms, doubling up
//!   to 1 s), never in a loop at full speed;
//! - after the file was reopened nothing is left to flush (closing a handle
//!   makes its non-durable commits durable, or, after an I/O error, they are
//!   lost with it).

use std::time::{Duration, Instant};

use crate::RedbDurability;

/// The first wait after a failed flush.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait between two failed flushes.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How a batch commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Commit {
    /// Durably, if it wrote anything (no commit otherwise).
    Durable,
    /// Durably, even if it wrote nothing: earlier non-durable commits must
    /// become durable now.
    Flush,
    /// Without an fsync (relaxed mode), if it wrote anything.
    Relaxed,
}

impl Commit {
    /// Whether a commit in this mode is durable.
    pub(crate) fn is_durable(self) -> bool {
        !matches!(self, Self::Relaxed)
    }
}

/// Relaxed mode's bookkeeping (see the module docs).
#[derive(Debug)]
pub(crate) struct FlushClock {
    /// `None` in the durable mode.
    every: Option<Duration>,
    /// When the oldest commit that is not yet durable was made.
    unflushed_since: Option<Instant>,
    /// After a failed flush: not before then.
    retry_at: Option<Instant>,
    /// The wait after the next failed flush.
    backoff: Duration,
}

impl FlushClock {
    pub(crate) fn new(durability: RedbDurability) -> Self {
        Self {
            every: match durability {
                RedbDurability::Immediate => None,
                RedbDurability::Relaxed { flush_every } => Some(flush_every),
            },
            unflushed_since: None,
            retry_at: None,
            backoff: FIRST_BACKOFF,
        }
    }

    /// When a flush is due, if some commit is not durable yet.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let due = self.unflushed_since? + self.every?;
        Some(self.retry_at.map_or(due, |retry| retry.max(due)))
    }

    /// How the next batch commits.
    pub(crate) fn mode(&self, now: Instant) -> Commit {
        if self.every.is_none() {
            Commit::Durable
        } else if self.deadline().is_some_and(|due| due <= now) {
            Commit::Flush
        } else {
            Commit::Relaxed
        }
    }

    /// A transaction was committed in `mode` at `now`.
    pub(crate) fn committed(&mut self, mode: Commit, now: Instant) {
        if mode.is_durable() {
            self.flushed();
        } else if self.unflushed_since.is_none() {
            self.unflushed_since = Some(now);
        }
    }

    /// Every earlier commit is durable now.
    pub(crate) fn flushed(&mut self) {
        self.unflushed_since = None;
        self.retry_at = None;
        self.backoff = FIRST_BACKOFF;
    }

    /// A flush failed at `now`: try again after the back-off.
    pub(crate) fn flush_failed(&mut self, now: Instant) {
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// The file was reopened: nothing of the old handle is left to flush.
    pub(crate) fn reopened(&mut self) {
        self.flushed();
    }

    /// Whether some commit is not durable yet.
    pub(crate) fn unflushed(&self) -> bool {
        self.unflushed_since.is_some()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const EVERY: Duration = Duration::from_millis(100);

    fn relaxed() -> FlushClock {
        FlushClock::new(RedbDurability::Relaxed { flush_every: EVERY })
    }

    #[test]
    fn durable_mode_commits_every_batch_durably_and_never_flushes() {
        let mut clock = FlushClock::new(RedbDurability::Immediate);
        let now = Instant::now();
        assert_eq!(clock.mode(now), Commit::Durable);
        clock.committed(Commit::Durable, now);
        assert_eq!(clock.deadline(), None);
    }

    #[test]
    fn the_clock_runs_from_the_oldest_unflushed_commit() {
        let mut clock = relaxed();
        let t0 = Instant::now();
        assert_eq!(clock.mode(t0), Commit::Relaxed);
        clock.committed(Commit::Relaxed, t0);
        clock.committed(Commit::Relaxed, t0 + EVERY / 2);
        assert_eq!(clock.deadline(), Some(t0 + EVERY));
        assert_eq!(clock.mode(t0 + EVERY / 2), Commit::Relaxed);
        // Due: the next batch flushes even if it writes nothing.
        assert_eq!(clock.mode(t0 + EVERY), Commit::Flush);
        clock.committed(Commit::Flush, t0 + EVERY);
        assert!(!clock.unflushed());
        assert_eq!(clock.deadline(), None);
    }

    #[test]
    fn a_failed_flush_backs_off_doubling_up_to_a_second() {
        let mut clock = relaxed();
        let t0 = Instant::now();
        clock.committed(Commit::Relaxed, t0);
        let mut now = t0 + EVERY;
        let mut waits = Vec::new();
        for _ in 0..10 {
            clock.flush_failed(now);
            let next = clock.deadline().unwrap();
            assert_eq!(clock.mode(now), Commit::Relaxed, "retried at once");
            waits.push(next - now);
            now = next;
        }
        assert_eq!(waits[0], FIRST_BACKOFF);
        assert_eq!(waits[1], FIRST_BACKOFF * 2);
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
        assert!(clock.unflushed(), "a failed flush made nothing durable");
        clock.committed(Commit::Flush, now);
        clock.committed(Commit::Relaxed, now);
        assert_eq!(
            clock.deadline(),
            Some(now + EVERY),
            "the back-off was reset"
        );
    }
}
