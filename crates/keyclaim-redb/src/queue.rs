//! The writer's queue: callers push operations, the writer thread takes
//! everything queued at once. It holds at most its capacity: a push beyond
//! it is refused at once (R10.6), so that overload fails fast instead of
//! piling up work and memory.
//!
//! A mutex around a `VecDeque` and a condition variable, instead of a
//! channel:
//!
//! - the writer thread sleeps in the kernel as soon as the queue is empty.
//!   A channel's blocking receive spins and calls `sched_yield` a few times
//!   first, which on a 2-core machine shared with other work takes CPU from
//!   the callers;
//! - a caller wakes the writer (a `futex` system call) only when it sleeps,
//!   not for every operation queued while it commits, and the writer takes
//!   what is queued (up to the batch size) under one lock.
//!
//! It made no measurable difference to a lone caller's latency; it is
//! simpler to reason about.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A multi-producer queue with one consumer that blocks without spinning.
pub(crate) struct JobQueue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

impl<T> std::fmt::Debug for JobQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("JobQueue")
            .field("queued", &state.items.len())
            .field("closed", &state.closed)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

struct State<T> {
    items: VecDeque<T>,
    /// No more pushes; the consumer drains what is left and stops.
    closed: bool,
    /// The consumer sleeps on `ready` (a push must wake it).
    sleeping: bool,
}

/// Why [`JobQueue::push`] gave an item back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused<T> {
    /// The queue holds its capacity.
    Full(T),
    /// The queue is closed.
    Closed(T),
}

/// What [`JobQueue::take`] found.
#[derive(Debug)]
pub(crate) enum Taken<T> {
    /// Up to `max` items, oldest first (never empty).
    Items(Vec<T>),
    /// The deadline passed with the queue empty.
    TimedOut,
    /// The queue is closed and empty.
    Closed,
}

impl<T> JobQueue<T> {
    /// An empty queue that holds at most `capacity` items (at least 1).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
                sleeping: false,
            }),
            ready: Condvar::new(),
        }
    }

    /// The state, also after a panic of another holder (the queue's own
    /// state is always consistent: every critical section is one push or
    /// one drain).
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most items the queue holds.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues `item`; gives it back when the queue is closed or full.
    pub(crate) fn push(&self, item: T) -> Result<(), Refused<T>> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed(item));
        }
        if state.items.len() >= self.capacity {
            return Err(Refused::Full(item));
        }
        state.items.push_back(item);
        let wake = state.sleeping;
        state.sleeping = false;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Closes the queue: later pushes fail, the consumer drains what is
    /// queued and then gets [`Taken::Closed`].
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Takes up to `max` queued items, sleeping until there is one (or
    /// until `deadline`, if given).
    pub(crate) fn take(&self, max: usize, deadline: Option<Instant>) -> Taken<T> {
        let mut state = self.lock();
        loop {
            if !state.items.is_empty() {
                let n = state.items.len().min(max.max(1));
                return Taken::Items(state.items.drain(..n).collect());
            }
            if state.closed {
                return Taken::Closed;
            }
            state.sleeping = true;
            state = match deadline {
                None => self
                    .ready
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        state.sleeping = false;
                        return Taken::TimedOut;
                    }
                    self.ready
                        .wait_timeout(state, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
            state.sleeping = false;
        }
    }

    /// Appends to `batch` what is queued now, up to `max` in all, waiting
    /// up to `linger` for more while fewer than `want` are in it.
    pub(crate) fn top_up(&self, batch: &mut Vec<T>, max: usize, want: usize, linger: Duration) {
        let deadline = Instant::now() + linger;
        let mut state = self.lock();
        loop {
            let n = state.items.len().min(max.saturating_sub(batch.len()));
            batch.extend(state.items.drain(..n));
            if batch.len() >= want.min(max) || state.closed {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state.sleeping = true;
            state = self
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
            state.sleeping = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_is_queued_up_to_max_then_drains_after_close() {
        let q = JobQueue::new(8);
        for i in 0..5 {
            assert!(q.push(i).is_ok());
        }
        assert!(matches!(q.take(3, None), Taken::Items(v) if v == [0, 1, 2]));
        q.close();
        assert_eq!(q.push(9), Err(Refused::Closed(9)));
        assert!(matches!(q.take(3, None), Taken::Items(v) if v == [3, 4]));
        assert!(matches!(q.take(3, None), Taken::Closed));
    }

    #[test]
    fn refuses_beyond_its_capacity_until_taken() {
        let q = JobQueue::new(2);
        assert!(q.push(1).is_ok());
        assert!(q.push(2).is_ok());
        assert_eq!(q.push(3), Err(Refused::Full(3)));
        assert!(matches!(q.take(1, None), Taken::Items(v) if v == [1]));
        assert!(q.push(3).is_ok());
    }

    #[test]
    fn times_out_when_empty() {
        let q: JobQueue<u8> = JobQueue::new(1);
        let soon = Instant::now() + Duration::from_millis(1);
        assert!(matches!(q.take(1, Some(soon)), Taken::TimedOut));
    }

    #[test]
    fn a_sleeping_consumer_is_woken_by_a_push() {
        let q = std::sync::Arc::new(JobQueue::new(1));
        let consumer = {
            let q = std::sync::Arc::clone(&q);
            std::thread::spawn(move || match q.take(8, None) {
                Taken::Items(v) => v,
                _ => Vec::new(),
            })
        };
        assert!(q.push(7u8).is_ok());
        assert_eq!(consumer.join().ok(), Some(vec![7]));
    }
}
