//! In-process change notifications (R11.1).

use tokio::sync::broadcast;

use crate::types::Changes;

/// How many change events a slow subscriber may fall behind before it sees
/// [`broadcast::error::RecvError::Lagged`] (and should then re-read state).
pub const NOTIFY_CAPACITY: usize = 1024;

/// A broadcast of [`Changes`], one per successful mutating operation that
/// changed something. Backends hold one and call [`ChangeNotifier::notify`]
/// after each commit; homeservers call `KeyStore::subscribe` to wake pending
/// `/sync` long-polls.
#[derive(Debug, Clone)]
pub struct ChangeNotifier {
    tx: broadcast::Sender<Changes>,
}

impl Default for ChangeNotifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeNotifier {
    /// A notifier with room for [`NOTIFY_CAPACITY`] pending events per subscriber.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(NOTIFY_CAPACITY);
        Self { tx }
    }

    /// A new subscription; it sees every event sent after this call.
    pub fn subscribe(&self) -> broadcast::Receiver<Changes> {
        self.tx.subscribe()
    }

    /// Sends an event to every subscriber, unless it is empty. Never blocks
    /// and never fails (no subscriber is fine).
    pub fn notify(&self, changes: &Changes) {
        if !changes.is_empty() {
            let _ = self.tx.send(changes.clone());
        }
    }
}
