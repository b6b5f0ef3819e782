//! The `keyclaim` command end to end, on small inputs: output and exit codes.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::Output;

use common::keyclaim;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn bench_memory_small_run_reports_and_checks_invariants() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let svg = dir.path().join("chart.svg");
    let o = keyclaim(&[
        "bench",
        "--backend",
        "memory",
        "--devices",
        "200",
        "--keys",
        "20",
        "--clients",
        "4",
        "--bulk",
        "50",
        "--ops",
        "2000",
        "--race-duration",
        "0.1",
        "--race-warmup",
        "0.05",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("all invariants held"), "{out}");
    for kind in [
        "claim",
        "bulk_claim",
        "refill",
        "fallback_rotation",
        "count_read",
    ] {
        assert!(out.contains(kind), "{kind} missing from the table:\n{out}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let b = &report["backends"][0];
    assert_eq!(b["backend"], "memory");
    assert_eq!(b["invariants"]["keys_issued_twice"], 0);
    assert_eq!(b["invariants"]["devices_with_wrong_count"], 0);
    assert!(b["invariants"]["otks_issued"].as_u64().unwrap() > 0);
    let races = b["races"].as_array().unwrap();
    let shapes: Vec<(&str, u64, u64)> = races
        .iter()
        .map(|r| {
            (
                r["scenario"].as_str().unwrap(),
                r["clients"].as_u64().unwrap(),
                r["devices"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shapes, [("one", 1, 1), ("hot", 4, 1), ("distinct", 4, 4)]);
    for r in races {
        assert_eq!(r["repetitions"], 3);
        assert!(r["baselines"].as_array().unwrap().is_empty());
        let k = &r["keyclaim"];
        assert_eq!(k["per_repetition"].as_array().unwrap().len(), 3, "{r}");
        let spread = &k["claims_per_sec"];
        let (lo, mid, hi) = (
            spread["min"].as_f64().unwrap(),
            spread["median"].as_f64().unwrap(),
            spread["max"].as_f64().unwrap(),
        );
        assert!(0.0 < lo && lo <= mid && mid <= hi, "{r}");
        assert_eq!(k["short_claims"], 0, "{r}");
        assert_eq!(k["keys_issued_twice"], 0, "{r}");
        assert_eq!(k["errors"], 0, "{r}");
        assert!(k["ran_dry"].is_boolean(), "{r}");
        // One device holds `--race-keys` (default 20,000, more than one
        // upload carries, so the store's cap was raised and the device
        // filled in several uploads); a device per client holds 500.
        let keys = if r["devices"] == 1 { 20_000 } else { 500 };
        assert_eq!(k["keys_per_device"], keys, "{r}");
        assert_eq!(k["refill_below"], keys * 4 / 5, "{r}");
    }
    assert!(out.contains("steady state:"), "{out}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    assert!(chart.contains("memory hot C=4"), "{chart}");
}

#[test]
fn bad_arguments_fail_with_messages() {
    let o = keyclaim(&["bench", "--backend", "nosuch", "--quiet"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nosuch"));
    let o = keyclaim(&["stats", "mysql://x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown store URL"));
    let o = keyclaim(&["frobnicate"]);
    assert!(!o.status.success());
}
