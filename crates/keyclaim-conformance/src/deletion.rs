//! Contract section 7: deletion.

use keyclaim::{KeyStore, UserId};

use crate::StoreFactory;
use crate::fixtures::*;

cases! { $ deletion;
    /// R7.1: deleting a device removes its OTKs, fallback keys and remembered
    /// issued keys; a new device with the same ID starts empty; others untouched.
    pub async fn r7_1_delete_device_removes_everything_of_it<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let (a, b) = (alice(), bob());
        let other_dev_same_user = dev("@alice:example.org", "PHONE");
        for d in [&a, &b, &other_dev_same_user] {
            put(&store, d, otks(SC, &["A", "B"]), otks(SC, &["F"])).await;
        }
        let issued = claim_one(&store, &a, SC).await.expect("A");
        let changes = store.delete_device(&a).await.expect("delete");
        assert!(changes.contains(&a));
        assert_eq!(count(&store, &a, SC).await, 0);
        assert!(unused(&store, &a).await.is_empty());
        assert!(claim_one(&store, &a, SC).await.is_none());
        // The remembered issued key went too: a new device may upload A again.
        let out = put(
            &store,
            &a,
            vec![(issued.key_id.clone(), issued.key_json.clone())],
            vec![],
        )
        .await;
        assert_eq!(
            out.counts.get_str(SC),
            1,
            "a new device starts with no memory"
        );
        for d in [&b, &other_dev_same_user] {
            assert_eq!(count(&store, d, SC).await, 2);
            assert_eq!(unused(&store, d).await, [SC]);
        }
        // Deleting an unknown device is fine and changes nothing.
        let none = store
            .delete_device(&dev("@ghost:example.org", "X"))
            .await
            .expect("delete");
        assert!(none.is_empty());
    }

    /// R7.2: deleting a user removes the keys of all its devices, no one else's.
    pub async fn r7_2_delete_user_removes_all_devices<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let alice_devices = [
            alice(),
            dev("@alice:example.org", "PHONE"),
            dev("@alice:example.org", "TAB"),
        ];
        // A user whose ID extends alice's must be untouched.
        let alicia = dev("@alice:example.orgx", "ALICEDEV");
        for d in alice_devices.iter().chain([&bob(), &alicia]) {
            put(&store, d, otks(SC, &["A"]), otks(SC, &["F"])).await;
        }
        let user = UserId::parse("@alice:example.org").unwrap();
        let changes = store.delete_user(&user).await.expect("delete user");
        for d in &alice_devices {
            assert!(changes.contains(d));
            assert_eq!(count(&store, d, SC).await, 0);
            assert!(unused(&store, d).await.is_empty());
        }
        for d in [&bob(), &alicia] {
            assert!(!changes.contains(d));
            assert_eq!(count(&store, d, SC).await, 1);
        }
    }
}
