//! `keyclaim bench` and PostgreSQL: without `--postgres URL` it starts a
//! throwaway durable server from the installed binaries, says so, and
//! leaves no server process or directory behind, also when interrupted;
//! `--no-postgres` leaves PostgreSQL out. The tests that start a server
//! need the PostgreSQL server binaries (under `CI=true` they are required).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{keyclaim, keyclaim_command};

/// A small run's sizes.
const SMALL: [&str; 16] = [
    "--devices",
    "40",
    "--keys",
    "10",
    "--clients",
    "4",
    "--bulk",
    "10",
    "--ops",
    "200",
    "--race-window",
    "0.1",
    "--race-warmup",
    "0.05",
    "--quiet",
    "--no-baseline",
];

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn binaries(what: &str) -> bool {
    keyclaim_testing::require(what, keyclaim_pgserver::find_bin_dir()).is_some()
}

/// The directory the bench said its throwaway server runs in.
fn server_dir(line: &str) -> Option<PathBuf> {
    let rest = line.split("throwaway server running in ").nth(1)?;
    Some(PathBuf::from(rest.split(';').next()?))
}

/// Processes (other than the cluster's watchdog shell) whose command line
/// names `dir`: a server left running.
fn server_processes(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) && !cmdline.contains("while [ -d /proc/") {
            found.push(cmdline);
        }
    }
    found
}

/// Waits (up to a deadline) until no process names `dir` at all: the
/// watchdog shell ends about a second after its owner.
fn wait_until_no_process_names(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let any = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|raw| String::from_utf8_lossy(&raw).contains(&needle))
        });
        if !any {
            return;
        }
        assert!(Instant::now() < deadline, "a process still names {dir:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bench_starts_a_durable_postgres_and_removes_it() {
    if !binaries("keyclaim bench with a throwaway PostgreSQL server") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("report.json");
    let mut args = vec!["bench", "--backend", "postgres", "--race-reps", "1"];
    args.extend(SMALL.iter().filter(|a| **a != "--no-baseline"));
    args.extend(["--json", json.to_str().unwrap()]);
    let o = keyclaim(&args);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("starting a throwaway durable server"), "{out}");
    let dir = out
        .lines()
        .find_map(server_dir)
        .expect("the server's directory");
    assert!(out.contains("throwaway server stopped"), "{out}");
    assert!(!dir.exists(), "{dir:?} left behind");
    assert_eq!(server_processes(&dir), Vec::<String>::new());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(
        report["postgres_server"]
            .as_str()
            .unwrap()
            .contains("throwaway durable server"),
        "{report}"
    );
    let b = &report["backends"][0];
    assert_eq!(b["backend"], "postgres");
    assert!(b["invariants"]["otks_issued"].as_u64().unwrap() > 0);
    for r in b["races"].as_array().unwrap() {
        let names: Vec<&str> = r["baselines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["postgres-baseline", "postgres-row-lock"], "{r}");
        assert_eq!(r["keyclaim"]["short_claims"], 0, "{r}");
        // The row-lock baseline never comes away short either.
        assert_eq!(r["baselines"][1]["short_claims"], 0, "{r}");
        // The baselines' devices hold what a homeserver's device holds by
        // default, whatever `--race-keys` gives keyclaim's.
        assert_eq!(r["baselines"][0]["keys_per_device"], 500, "{r}");
    }
    wait_until_no_process_names(&dir);
}

#[test]
fn an_interrupted_bench_stops_and_removes_its_server() {
    if !binaries("keyclaim bench interrupted with a throwaway PostgreSQL server") {
        return;
    }
    let mut args = vec!["bench", "--backend", "postgres", "--duration", "600"];
    args.extend(SMALL.iter().filter(|a| !["--ops", "200"].contains(*a)));
    let mut child = keyclaim_command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let dir = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("no server line in {seen:?}"))
            .unwrap();
        if let Some(dir) = server_dir(&line) {
            break dir;
        }
        seen.push(line);
    };
    assert!(dir.exists());
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "the bench did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(code, Some(2), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("throwaway server stopped")),
        "{rest:?}"
    );
    // Removed by the bench itself, before it exited.
    assert!(!dir.exists(), "{dir:?} left behind");
    assert_eq!(server_processes(&dir), Vec::<String>::new());
    wait_until_no_process_names(&dir);
}

#[test]
fn no_postgres_leaves_postgres_out() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("report.json");
    let mut args = vec!["bench", "--no-postgres", "--race-reps", "1"];
    args.extend(SMALL);
    args.extend(["--json", json.to_str().unwrap()]);
    // Even with a server named, --no-postgres wins.
    let o = keyclaim_command(&args)
        .env(
            "KEYCLAIM_POSTGRES_URL",
            "postgres://nobody@127.0.0.1:1/none",
        )
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("PostgreSQL: left out (--no-postgres)"),
        "{out}"
    );
    assert!(!out.contains("throwaway"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let backends: Vec<&str> = report["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backend"].as_str().unwrap())
        .collect();
    assert!(!backends.contains(&"postgres"), "{backends:?}");
    assert_eq!(backends.first(), Some(&"memory"), "{backends:?}");
    assert!(
        backends.len() > 1,
        "every other built backend runs: {backends:?}"
    );
    assert!(report["postgres_server"].is_null());
}
