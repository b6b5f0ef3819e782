//! A cluster starts with the settings asked for, and dropping it stops the
//! server and removes its directory. Needs the PostgreSQL server binaries
//! (under `CI=true` they are required).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;

use keyclaim_pgserver::{Cluster, find_bin_dir};

fn binaries() -> bool {
    match find_bin_dir() {
        Ok(_) => true,
        Err(e) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "no PostgreSQL binaries under CI: {e}");
            eprintln!("\n!!!!!!!! SKIPPED keyclaim-pgserver cluster test: {e}\n");
            false
        }
    }
}

/// Whether the cluster's configuration sets `line` (the default file holds
/// every setting commented out, so a line of its own is needed).
fn sets(conf: &str, line: &str) -> bool {
    conf.lines().any(|l| l.trim() == line)
}

/// Whether process `pid` is running (a zombie is not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

fn postmaster_pid(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join("data/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_durable_cluster_runs_durable_and_leaves_nothing_behind() {
    if !binaries() {
        return;
    }
    let cluster = Cluster::start(true).unwrap();
    let dir = cluster.dir().to_owned();
    let conf = std::fs::read_to_string(dir.join("data/postgresql.conf")).unwrap();
    for setting in [
        "fsync = on",
        "full_page_writes = on",
        "synchronous_commit = on",
    ] {
        assert!(sets(&conf, setting), "{setting} missing");
    }
    assert!(cluster.url().contains(&dir.display().to_string()));
    let pid = postmaster_pid(&dir);
    assert!(running(pid));
    drop(cluster);
    assert!(!dir.exists(), "{dir:?} left behind");
    assert!(!running(pid), "the server still runs");
}

#[test]
fn a_fast_cluster_runs_without_fsync() {
    if !binaries() {
        return;
    }
    let cluster = Cluster::start(false).unwrap();
    let conf = std::fs::read_to_string(cluster.dir().join("data/postgresql.conf")).unwrap();
    assert!(sets(&conf, "fsync = off"));
    assert!(!sets(&conf, "fsync = on"));
    assert!(!sets(&conf, "synchronous_commit = on"));
}
