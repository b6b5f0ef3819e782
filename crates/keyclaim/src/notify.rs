//! In-process change notifications (R11.1), bounded in memory (R11.3).

use tokio::sync::broadcast;

use crate::types::Changes;

/// How many change events a slow subscriber may fall behind before it sees
/// [`broadcast::error::RecvError::Lagged`] (and should then re-read state).
pub const NOTIFY_CAPACITY: usize = 256;

/// The most devices one change event lists; a change of more devices (a
/// claim for a big room) is sent as several events. With
/// [`NOTIFY_CAPACITY`], a slow subscriber pins at most 16,384 devices, about
/// 9 MiB with the longest IDs the contract allows (R11.3).
pub const MAX_DEVICES_PER_EVENT: usize = 64;

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

    /// Sends the changes to every subscriber, as one event or, past
    /// [`MAX_DEVICES_PER_EVENT`] devices, as several; nothing when empty.
    /// Never blocks and never fails (no subscriber is fine).
    pub fn notify(&self, changes: &Changes) {
        if changes.devices().len() <= MAX_DEVICES_PER_EVENT {
            if !changes.is_empty() {
                let _ = self.tx.send(changes.clone());
            }
            return;
        }
        for chunk in changes.devices().chunks(MAX_DEVICES_PER_EVENT) {
            let _ = self.tx.send(Changes::from_sorted(chunk));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ids::Device;

    fn devices(n: usize) -> Vec<Device> {
        (0..n)
            .map(|i| Device::parse(&format!("@u{i:05}:x"), "D").unwrap())
            .collect()
    }

    /// R11.3: a big change is split into events of at most
    /// `MAX_DEVICES_PER_EVENT` devices that together list every device once.
    #[test]
    fn r11_3_big_changes_are_split() {
        let notifier = ChangeNotifier::new();
        let mut rx = notifier.subscribe();
        let all = devices(MAX_DEVICES_PER_EVENT * 2 + 5);
        notifier.notify(&Changes::from_devices(all.clone()));
        let mut seen = Vec::new();
        while let Ok(event) = rx.try_recv() {
            assert!(event.devices().len() <= MAX_DEVICES_PER_EVENT);
            seen.extend(event.devices().iter().cloned());
        }
        assert_eq!(seen, all);
    }

    /// R11.3: a subscriber that stops reading holds at most
    /// `NOTIFY_CAPACITY` events and is then told that it lagged.
    #[test]
    fn r11_3_a_slow_subscriber_is_told_it_lagged() {
        let notifier = ChangeNotifier::new();
        let mut rx = notifier.subscribe();
        for device in devices(NOTIFY_CAPACITY + 10) {
            notifier.notify(&Changes::from_devices([device]));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
        let mut rest = 0;
        while rx.try_recv().is_ok() {
            rest += 1;
        }
        assert_eq!(rest, NOTIFY_CAPACITY);
    }

    /// R11.3: reports that were lost reach subscribers as one unknown
    /// event, which names no device and matches every device and user.
    #[test]
    fn r11_3_lost_reports_arrive_as_one_unknown_event() {
        let notifier = ChangeNotifier::new();
        let mut rx = notifier.subscribe();
        notifier.notify(&Changes::unknown());
        let event = rx.try_recv().unwrap();
        assert!(event.is_unknown());
        assert!(!event.is_empty());
        assert!(event.devices().is_empty());
        let device = devices(1).remove(0);
        assert!(event.contains(&device));
        assert!(event.contains_user(&device.user_id));
        assert!(rx.try_recv().is_err());
        // Ordinary changes are not unknown, and match only their devices.
        let known = Changes::from_devices(devices(2).into_iter().skip(1));
        assert!(!known.is_unknown());
        assert!(!known.contains(&device));
        assert!(!Changes::none().contains(&device));
    }
}
