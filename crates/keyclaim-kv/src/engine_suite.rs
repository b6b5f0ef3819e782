//! Checks an engine adapter against the contract of [`KvEngine`], on its
//! own, without the layer.
//!
//! Each check is a plain function taking a fresh, empty engine; it panics
//! with a message naming the rule it found broken. An adapter's tests run
//! them all with one macro call, one `#[test]` per check:
//!
//! ```
//! mod engine_contract {
//!     keyclaim_kv::engine_tests!(keyclaim_kv::MemoryEngine::new());
//! }
//! ```
//!
//! or call [`run`] with a factory of empty engines. The engine must be
//! empty: the checks own every space.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::engine::{KvEngine, Space, WriteBatch};

/// A named check of the suite.
pub type Check = fn(&dyn KvEngine);

/// Every check, with its name.
pub const CHECKS: &[(&str, Check)] = &[
    ("empty_engine_reads_nothing", empty_engine_reads_nothing),
    ("put_get_overwrite_delete", put_get_overwrite_delete),
    ("spaces_are_separate", spaces_are_separate),
    (
        "scan_is_in_unsigned_byte_order",
        scan_is_in_unsigned_byte_order,
    ),
    ("scan_bounds_and_early_stop", scan_bounds_and_early_stop),
    ("values_are_bytes", values_are_bytes),
    ("get_many_answers_in_order", get_many_answers_in_order),
    ("batch_applies_across_spaces", batch_applies_across_spaces),
    (
        "batches_are_atomic_to_readers",
        batches_are_atomic_to_readers,
    ),
    (
        "writes_are_read_by_other_threads",
        writes_are_read_by_other_threads,
    ),
];

/// Runs every check, each on a fresh engine from `make`.
///
/// # Panics
/// When the engine breaks a rule (the message names it), or `make` panics.
pub fn run<E: KvEngine>(mut make: impl FnMut() -> E) {
    for (name, check) in CHECKS {
        let engine = make();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&engine)));
        if let Err(payload) = outcome {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("engine check {name} failed: {message}");
        }
    }
}

/// Stamps one `#[test]` per check of [`CHECKS`], each on a fresh engine
/// made by the expression given (evaluated once per test).
#[macro_export]
macro_rules! engine_tests {
    ($make:expr) => {
        $crate::__engine_test!($make; empty_engine_reads_nothing);
        $crate::__engine_test!($make; put_get_overwrite_delete);
        $crate::__engine_test!($make; spaces_are_separate);
        $crate::__engine_test!($make; scan_is_in_unsigned_byte_order);
        $crate::__engine_test!($make; scan_bounds_and_early_stop);
        $crate::__engine_test!($make; values_are_bytes);
        $crate::__engine_test!($make; get_many_answers_in_order);
        $crate::__engine_test!($make; batch_applies_across_spaces);
        $crate::__engine_test!($make; batches_are_atomic_to_readers);
        $crate::__engine_test!($make; writes_are_read_by_other_threads);
    };
}

/// One test of [`engine_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __engine_test {
    ($make:expr; $name:ident) => {
        #[test]
        fn $name() {
            let engine = $make;
            $crate::engine_suite::$name(&engine);
        }
    };
}

fn get(engine: &dyn KvEngine, space: Space, key: &[u8]) -> Option<Vec<u8>> {
    match engine.get(space, key) {
        Ok(v) => v,
        Err(e) => panic!("get({space}, {key:?}) failed: {e}"),
    }
}

fn write(engine: &dyn KvEngine, batch: &WriteBatch, durable: bool) {
    if let Err(e) = engine.write(batch, durable) {
        panic!("write of {} changes failed: {e}", batch.len());
    }
}

fn put(engine: &dyn KvEngine, space: Space, key: &[u8], value: &[u8]) {
    let mut batch = WriteBatch::new();
    batch.put(space, key.to_vec(), value.to_vec());
    write(engine, &batch, true);
}

/// Every key of `space` in `[start, end)`, as the engine visits them.
fn scan(
    engine: &dyn KvEngine,
    space: Space,
    start: &[u8],
    end: Option<&[u8]>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let scanned = engine.scan(space, start, end, &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        ControlFlow::Continue(())
    });
    if let Err(e) = scanned {
        panic!("scan({space}, {start:?}..{end:?}) failed: {e}");
    }
    out
}

fn keys(rows: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    rows.iter().map(|(k, _)| k.clone()).collect()
}

/// A fresh engine has no key in any space.
pub fn empty_engine_reads_nothing(engine: &dyn KvEngine) {
    for space in Space::ALL {
        assert_eq!(
            get(engine, space, b"k"),
            None,
            "{space}: a key in a new engine"
        );
        assert!(
            scan(engine, space, b"", None).is_empty(),
            "{space}: a scan of a new engine found keys"
        );
    }
    // An empty batch is accepted.
    write(engine, &WriteBatch::new(), true);
}

/// A put is read back, a second put replaces it, a delete removes it, and
/// deleting an absent key does nothing.
pub fn put_get_overwrite_delete(engine: &dyn KvEngine) {
    put(engine, Space::Keys, b"a", b"1");
    assert_eq!(get(engine, Space::Keys, b"a").as_deref(), Some(&b"1"[..]));
    put(engine, Space::Keys, b"a", b"2");
    assert_eq!(
        get(engine, Space::Keys, b"a").as_deref(),
        Some(&b"2"[..]),
        "a second put must replace the value"
    );
    let mut batch = WriteBatch::new();
    batch.delete(Space::Keys, b"a".to_vec());
    batch.delete(Space::Keys, b"absent".to_vec());
    write(engine, &batch, true);
    assert_eq!(get(engine, Space::Keys, b"a"), None, "delete must remove");
    assert!(scan(engine, Space::Keys, b"", None).is_empty());
}

/// The same key in every space holds a value of its own, and a scan of one
/// space never shows another's keys.
pub fn spaces_are_separate(engine: &dyn KvEngine) {
    let mut batch = WriteBatch::new();
    for space in Space::ALL {
        batch.put(space, b"same".to_vec(), space.name().as_bytes().to_vec());
        batch.put(space, space.name().as_bytes().to_vec(), b"own".to_vec());
    }
    write(engine, &batch, true);
    for space in Space::ALL {
        assert_eq!(
            get(engine, space, b"same").as_deref(),
            Some(space.name().as_bytes()),
            "{space}: the value of another space"
        );
        let mut want = vec![b"same".to_vec(), space.name().as_bytes().to_vec()];
        want.sort();
        assert_eq!(
            keys(&scan(engine, space, b"", None)),
            want,
            "{space}: a scan must see its own keys only"
        );
    }
    let mut batch = WriteBatch::new();
    batch.delete(Space::Devices, b"same".to_vec());
    write(engine, &batch, true);
    assert_eq!(get(engine, Space::Devices, b"same"), None);
    assert!(
        get(engine, Space::Keys, b"same").is_some(),
        "a delete in one space removed the key of another"
    );
}

/// Scans visit keys in unsigned byte order (memcmp), shorter first on a
/// common prefix, whatever order they were written in.
pub fn scan_is_in_unsigned_byte_order(engine: &dyn KvEngine) {
    let written: Vec<&[u8]> = vec![
        b"\xff",
        b"\x80",
        b"\x00",
        b"a\x00",
        b"a",
        b"\x7f",
        b"\xff\x00",
        b"\x01",
        b"a\xff",
        b"\x00\x00",
        b"ab",
        b"\x00\xff",
        b"b",
    ];
    // Half in one batch, half one at a time, in no order.
    let mut batch = WriteBatch::new();
    for (i, key) in written.iter().enumerate() {
        if i % 2 == 0 {
            batch.put(Space::Ids, key.to_vec(), vec![u8::try_from(i).unwrap_or(0)]);
        } else {
            put(engine, Space::Ids, key, &[u8::try_from(i).unwrap_or(0)]);
        }
    }
    write(engine, &batch, false);
    let mut want: Vec<Vec<u8>> = written.iter().map(|k| k.to_vec()).collect();
    want.sort();
    assert_eq!(
        keys(&scan(engine, Space::Ids, b"", None)),
        want,
        "a scan must visit keys in unsigned byte order"
    );
}

/// `start` is inclusive, `end` exclusive, `None` unbounded; a range with
/// `end <= start` is empty; `Break` stops the scan.
pub fn scan_bounds_and_early_stop(engine: &dyn KvEngine) {
    let mut batch = WriteBatch::new();
    for i in 0u8..10 {
        batch.put(Space::Keys, vec![b'k', i], vec![i]);
    }
    batch.put(Space::Keys, b"j".to_vec(), b"before".to_vec());
    batch.put(Space::Keys, b"l".to_vec(), b"after".to_vec());
    write(engine, &batch, true);
    let got = keys(&scan(engine, Space::Keys, &[b'k', 2], Some(&[b'k', 5])));
    assert_eq!(
        got,
        vec![vec![b'k', 2], vec![b'k', 3], vec![b'k', 4]],
        "[2, 5)"
    );
    // A prefix scan: start at the prefix, end at its successor.
    let got = scan(engine, Space::Keys, b"k", Some(b"l"));
    assert_eq!(got.len(), 10, "the prefix k");
    assert_eq!(got[0], (vec![b'k', 0], vec![0]));
    let got = keys(&scan(engine, Space::Keys, &[b'k', 8], None));
    assert_eq!(
        got,
        vec![vec![b'k', 8], vec![b'k', 9], b"l".to_vec()],
        "unbounded"
    );
    assert!(
        scan(engine, Space::Keys, b"k", Some(b"k")).is_empty(),
        "empty range"
    );
    assert!(
        scan(engine, Space::Keys, b"l", Some(b"k")).is_empty(),
        "reversed range"
    );
    assert!(
        scan(engine, Space::Keys, b"m", None).is_empty(),
        "past the end"
    );
    let mut seen = 0;
    let scanned = engine.scan(Space::Keys, b"", None, &mut |_, _| {
        seen += 1;
        if seen == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(scanned.is_ok(), "an early stop is not an error");
    assert_eq!(seen, 3, "Break must stop the scan");
}

/// Values are bytes: empty values, zero bytes and large values read back as
/// written; keys may hold any byte.
pub fn values_are_bytes(engine: &dyn KvEngine) {
    let large: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut batch = WriteBatch::new();
    batch.put(Space::Keys, b"empty".to_vec(), Vec::new());
    batch.put(Space::Keys, b"zeros".to_vec(), vec![0, 0, 1, 0]);
    batch.put(Space::Keys, b"large".to_vec(), large.clone());
    batch.put(Space::Keys, vec![0, 255, 0], b"binary key".to_vec());
    write(engine, &batch, true);
    assert_eq!(
        get(engine, Space::Keys, b"empty"),
        Some(Vec::new()),
        "an empty value"
    );
    assert_eq!(get(engine, Space::Keys, b"zeros"), Some(vec![0, 0, 1, 0]));
    assert_eq!(get(engine, Space::Keys, b"large"), Some(large));
    assert_eq!(
        get(engine, Space::Keys, &[0, 255, 0]).as_deref(),
        Some(&b"binary key"[..])
    );
}

/// `get_many` answers each key's value in the order asked, absent keys as
/// `None`.
pub fn get_many_answers_in_order(engine: &dyn KvEngine) {
    put(engine, Space::Devices, b"b", b"2");
    put(engine, Space::Devices, b"a", b"1");
    let asked: [&[u8]; 4] = [b"b", b"x", b"a", b"b"];
    match engine.get_many(Space::Devices, &asked) {
        Ok(got) => assert_eq!(
            got,
            vec![
                Some(b"2".to_vec()),
                None,
                Some(b"1".to_vec()),
                Some(b"2".to_vec())
            ]
        ),
        Err(e) => panic!("get_many failed: {e}"),
    }
}

/// One batch of puts and deletes in every space is applied whole.
pub fn batch_applies_across_spaces(engine: &dyn KvEngine) {
    let mut batch = WriteBatch::new();
    for space in Space::ALL {
        batch.put(space, b"old".to_vec(), b"x".to_vec());
    }
    write(engine, &batch, true);
    let mut batch = WriteBatch::new();
    for space in Space::ALL {
        batch.delete(space, b"old".to_vec());
        batch.put(space, b"new".to_vec(), b"y".to_vec());
    }
    write(engine, &batch, false);
    for space in Space::ALL {
        assert_eq!(
            get(engine, space, b"old"),
            None,
            "{space}: a delete of the batch"
        );
        assert_eq!(get(engine, space, b"new").as_deref(), Some(&b"y"[..]));
    }
}

/// Rule 2: while batches that each raise one counter in every space commit,
/// readers reading the counters one after another, in both orders, never see
/// a later counter behind an earlier one.
pub fn batches_are_atomic_to_readers(engine: &dyn KvEngine) {
    const ROUNDS: u64 = 2_000;
    let done = AtomicBool::new(false);
    let counter = |space: Space| {
        get(engine, space, b"counter").map_or(0, |v| {
            let bytes: [u8; 8] = v.as_slice().try_into().unwrap_or([0; 8]);
            u64::from_be_bytes(bytes)
        })
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            for round in 1..=ROUNDS {
                let mut batch = WriteBatch::new();
                for space in Space::ALL {
                    batch.put(space, b"counter".to_vec(), round.to_be_bytes().to_vec());
                }
                write(engine, &batch, round % 2 == 0);
            }
            done.store(true, Ordering::SeqCst);
        });
        for forward in [true, false] {
            let done = &done;
            s.spawn(move || {
                let mut order = Space::ALL;
                if !forward {
                    order.reverse();
                }
                while !done.load(Ordering::SeqCst) {
                    let mut last = 0;
                    for space in order {
                        let now = counter(space);
                        assert!(
                            now >= last,
                            "{space} showed round {now} after another space showed {last}: \
                             a reader saw part of a batch"
                        );
                        last = now;
                    }
                }
            });
        }
    });
    for space in Space::ALL {
        assert_eq!(counter(space), ROUNDS, "{space}: the last batch");
    }
}

/// Rule 4: once `write` returned, another thread reads the batch.
pub fn writes_are_read_by_other_threads(engine: &dyn KvEngine) {
    for i in 0u32..200 {
        let key = i.to_be_bytes();
        let mut batch = WriteBatch::new();
        batch.put(Space::Keys, key.to_vec(), b"v".to_vec());
        batch.put(Space::Meta, key.to_vec(), b"v".to_vec());
        write(engine, &batch, i % 2 == 0);
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(
                    get(engine, Space::Keys, &key).is_some(),
                    "a written key was not read by another thread"
                );
                assert_eq!(scan(engine, Space::Meta, &key, None).len(), 1);
            });
        });
    }
}
