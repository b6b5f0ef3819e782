//! Contract section 11: change notifications.

use std::time::Duration;

use keyclaim::{Changes, KeyStore};

use crate::StoreFactory;
use crate::fixtures::*;

cases! { $ notify;
    /// R11.1: every mutation reports the devices whose counts or fallback state
    /// it changed; one that changed nothing reports nothing.
    pub async fn r11_1_mutations_report_changed_devices<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let (a, b) = (alice(), bob());
        let out = put(&store, &a, otks(SC, &["A"]), vec![]).await;
        assert_eq!(out.changes.devices(), std::slice::from_ref(&a));
        let out = put(&store, &a, otks(SC, &["A"]), vec![]).await;
        assert!(out.changes.is_empty(), "a retry changes nothing");
        put(&store, &b, vec![], otks(SC, &["F"])).await;
        let out = store
            .claim(&[
                keyclaim::ClaimTarget::one(a.clone(), alg(SC)),
                keyclaim::ClaimTarget::one(b.clone(), alg(SC)),
            ])
            .await
            .expect("claim");
        assert_eq!(out.changes.devices(), [a.clone(), b.clone()]);
        let out = claim_n(&store, &b, SC, 1).await;
        assert!(
            out.changes.is_empty(),
            "handing out an already used fallback changes nothing"
        );
        let out = claim_n(&store, &a, SC, 1).await;
        assert!(out.changes.is_empty() && out.keys.is_empty());
        assert_eq!(
            store.delete_device(&b).await.expect("delete").devices(),
            std::slice::from_ref(&b)
        );
    }

    /// R11.1: subscribers are woken by each change, in order.
    pub async fn r11_1_subscribers_are_woken<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let mut rx = store.subscribe();
        let a = alice();
        put(&store, &a, otks(SC, &["A"]), vec![]).await;
        assert!(next(&mut rx).await.contains(&a));
        claim_one(&store, &a, SC).await.expect("A");
        assert!(next(&mut rx).await.contains(&a));
        put(&store, &bob(), vec![], otks(SC, &["F"])).await;
        assert!(next(&mut rx).await.contains(&bob()));
        store.delete_user(&bob().user_id).await.expect("delete");
        assert!(next(&mut rx).await.contains(&bob()));
    }

    /// R11.3: change reports are bounded: a big claim is reported in events of
    /// at most `MAX_DEVICES_PER_EVENT` devices that together list every
    /// device, and a subscriber that stops reading is told that it lagged
    /// instead of holding every event.
    pub async fn r11_3_reports_are_bounded_and_lag_is_told<F: StoreFactory>(f: &F) {
        use keyclaim::backend::{MAX_DEVICES_PER_EVENT, NOTIFY_CAPACITY};
        use keyclaim::broadcast::error::TryRecvError;
        let store = fresh(f).await;
        let n = MAX_DEVICES_PER_EVENT * 2 + 3;
        let devices: Vec<_> = (0..n)
            .map(|i| dev(&format!("@u{i:04}:example.org"), "D"))
            .collect();
        for d in &devices {
            put(&store, d, otks(SC, &["K"]), vec![]).await;
        }
        let mut rx = store.subscribe();
        let targets: Vec<_> = devices
            .iter()
            .map(|d| keyclaim::ClaimTarget::one(d.clone(), alg(SC)))
            .collect();
        store.claim(&targets).await.expect("claim");
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < n {
            let event = rx.recv().await.expect("an event");
            assert!(
                event.devices().len() <= MAX_DEVICES_PER_EVENT,
                "{} devices in one event",
                event.devices().len()
            );
            seen.extend(event.devices().iter().cloned());
        }
        assert_eq!(seen, devices.iter().cloned().collect());
        // A subscriber that reads nothing while more events than the capacity
        // arrive is told that it lagged.
        let mut slow = store.subscribe();
        for d in devices.iter().cycle().take(NOTIFY_CAPACITY + 5) {
            store.delete_device(d).await.expect("delete");
            put(&store, d, otks(SC, &["K2"]), vec![]).await;
        }
        assert!(
            matches!(slow.try_recv(), Err(TryRecvError::Lagged(_))),
            "told it lagged"
        );
    }
}

async fn next(rx: &mut keyclaim::broadcast::Receiver<Changes>) -> Changes {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a change event within 10 s")
        .expect("the channel is open")
}
