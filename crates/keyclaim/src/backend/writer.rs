//! What a backend with a writer thread of its own (group commit) shares
//! with the others that have one: the mutating operations it queues, their
//! answers, and the errors of its queue and thread.
//!
//! A store turns each [`Backend`](super::Backend) mutation into a
//! [`WriteOp`], queues it to its writer, and reads the answer back with
//! [`WriteReply::into_answer`]; the writer runs the op inside its batch and
//! answers a [`WriteReply`] of the op's kind.

use crate::error::{Error, Result};
use crate::ids::{Device, DeviceId, UserId};
use crate::types::{
    Changes, ClaimOutcome, ClaimTarget, DeviceSnapshot, FallbackTarget, ResetScope, Upload,
    UploadOutcome,
};

/// One mutating operation, as a writer thread runs it.
#[derive(Debug)]
pub enum WriteOp {
    /// An upload (section 3).
    Upload(Upload),
    /// A claim (section 4), or its one-time step (R12.1) without
    /// `fall_back`.
    Claim {
        /// The targets, as core validated and clamped them.
        targets: Box<[ClaimTarget]>,
        /// Whether a target without OTKs gets its fallback key (R4.4).
        fall_back: bool,
    },
    /// The fallback step of a split claim (R12.2).
    ClaimFallbacks(Box<[FallbackTarget]>),
    /// A key reset (R13.1).
    Reset(Device, ResetScope),
    /// A dehydrated device's replacement (R14.1): the previous device's
    /// deletion and the upload, in one transaction.
    Replace {
        /// The user's device to delete first, if any.
        previous: Option<DeviceId>,
        /// The new device's upload.
        upload: Upload,
    },
    /// A device's deletion (R7.1).
    DeleteDevice(Device),
    /// A user's deletion (R7.2).
    DeleteUser(UserId),
    /// A device's state replaced by a snapshot (import).
    Import(DeviceSnapshot),
}

impl WriteOp {
    /// The operation's name in errors and logs, as the
    /// [`Backend`](super::Backend) method that made it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Upload(_) => "upload",
            Self::Claim {
                fall_back: true, ..
            } => "claim",
            Self::Claim {
                fall_back: false, ..
            } => "claim_one_time_keys",
            Self::ClaimFallbacks(_) => "claim_fallback_keys",
            Self::Reset(..) => "reset_one_time_keys",
            Self::Replace { .. } => "replace_device",
            Self::DeleteDevice(_) => "delete_device",
            Self::DeleteUser(_) => "delete_user",
            Self::Import(_) => "import_device",
        }
    }
}

/// What a [`WriteOp`] answers: an upload, reset or replace an
/// [`UploadOutcome`], a claim a [`ClaimOutcome`] (decoded before the commit,
/// R10.7), a deletion or import the [`Changes`].
#[derive(Debug)]
pub enum WriteReply {
    /// Of [`WriteOp::Upload`], [`WriteOp::Reset`], [`WriteOp::Replace`].
    Upload(UploadOutcome),
    /// Of [`WriteOp::Claim`], [`WriteOp::ClaimFallbacks`].
    Claim(ClaimOutcome),
    /// Of [`WriteOp::DeleteDevice`], [`WriteOp::DeleteUser`],
    /// [`WriteOp::Import`].
    Changes(Changes),
}

impl WriteReply {
    /// Whether the operation wrote anything (a batch in which none did
    /// needs no commit).
    pub fn wrote(&self) -> bool {
        match self {
            Self::Upload(o) => !o.changes.is_empty(),
            Self::Claim(o) => !o.changes.is_empty(),
            Self::Changes(c) => !c.is_empty(),
        }
    }

    /// The answer as the kind the caller expects, or a non-retryable
    /// [`Error::Storage`] of `backend` when the writer answered operation
    /// `op` with another kind (a bug).
    ///
    /// # Errors
    /// As said.
    pub fn into_answer<T: FromWriteReply>(
        self,
        backend: &'static str,
        op: &'static str,
    ) -> Result<T> {
        T::from_reply(self).ok_or_else(|| {
            Error::storage(backend, op, false, "the writer answered another operation")
        })
    }
}

/// An answer a [`WriteReply`] may hold.
pub trait FromWriteReply: Sized {
    /// The answer, if `reply` is of this kind.
    fn from_reply(reply: WriteReply) -> Option<Self>;
}

impl FromWriteReply for UploadOutcome {
    fn from_reply(reply: WriteReply) -> Option<Self> {
        match reply {
            WriteReply::Upload(outcome) => Some(outcome),
            _ => None,
        }
    }
}

impl FromWriteReply for ClaimOutcome {
    fn from_reply(reply: WriteReply) -> Option<Self> {
        match reply {
            WriteReply::Claim(outcome) => Some(outcome),
            _ => None,
        }
    }
}

impl FromWriteReply for Changes {
    fn from_reply(reply: WriteReply) -> Option<Self> {
        match reply {
            WriteReply::Changes(changes) => Some(changes),
            _ => None,
        }
    }
}

/// Operation `op` of `backend` found its `queue` (say "redb writer's")
/// full (R10.6): a retryable [`Error::Storage`]; nothing of it was queued.
pub fn queue_full(backend: &'static str, op: &'static str, queue: &str, bound: usize) -> Error {
    Error::storage(
        backend,
        op,
        true,
        format!("the {queue} queue is full ({bound} operations waiting); try again later"),
    )
}

/// The writer thread of `backend` panicked while it held operation `op` and
/// dropped it unanswered: a non-retryable [`Error::Storage`], because
/// whether the operation was applied is unknown (a panic inside the
/// storage's commit may have applied it).
pub fn writer_panicked(backend: &'static str, op: &'static str) -> Error {
    Error::storage(
        backend,
        op,
        false,
        format!(
            "the {backend} writer thread panicked before answering; the operation may or may \
             not have been applied"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_of_another_kind_is_an_error_naming_the_operation() {
        let reply = WriteReply::Changes(Changes::default());
        assert!(!reply.wrote());
        let err = reply
            .into_answer::<UploadOutcome>("test", "upload")
            .expect_err("another kind");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("upload"), "{err}");
        let changes: Changes = WriteReply::Changes(Changes::default())
            .into_answer("test", "delete_device")
            .expect("same kind");
        assert!(changes.is_empty());
    }

    #[test]
    fn a_full_queue_is_retryable() {
        let err = queue_full("test", "claim", "test writer's", 8);
        assert!(err.is_retryable());
        assert!(format!("{err:?}").contains("queue is full"), "{err:?}");
    }
}
