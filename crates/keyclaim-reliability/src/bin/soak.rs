//! The soak: a long mixed workload against a persistent backend, with the
//! worker killed by SIGKILL at random moments and every invariant checked
//! after each crash (see `keyclaim_reliability::soak`). Hours, not CI:
//!
//! ```text
//! cargo build --release -p keyclaim-reliability --bin soak
//! nice target/release/soak --backend sqlite --minutes 120 [--dir DIR] [--seed N] [--kill-ms 200..2000]
//! nice target/release/soak --backend postgres --url URL [--restart-cmd CMD --restart-every N] --minutes 60
//! ```
//!
//! PostgreSQL's store is the schema named in `URL` (`keyclaim_schema=...`,
//! which must not exist yet); `--restart-cmd` is a shell command that
//! crashes and restarts the server and returns once it accepts connections,
//! run every `N`th worker generation while the worker works.
//!
//! Prints a progress line per minute, with the violations found since the
//! last one, and a summary; exits 1 if any violation was found.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use keyclaim_reliability::backends::Backend;
use keyclaim_reliability::soak::{Restart, SoakConfig, run, worker};

const USAGE: &str = "usage: soak --backend sqlite|redb|rocksdb|postgres [--minutes M | --seconds S] [--dir DIR] [--seed N] [--kill-ms MIN..MAX] [--url URL] [--restart-cmd CMD] [--restart-every N]";

fn fail(msg: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "soak: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("no runtime: {e}")),
    };
    if args.first().map(String::as_str) == Some("worker") {
        // worker BACKEND STORE JOURNAL SEED GENERATION
        let parsed = (|| {
            Some((
                Backend::parse(args.get(1)?)?,
                PathBuf::from(args.get(2)?),
                PathBuf::from(args.get(3)?),
                args.get(4)?.parse::<u64>().ok()?,
                args.get(5)?.parse::<u64>().ok()?,
            ))
        })();
        let Some((backend, store, journal, seed, generation)) = parsed else {
            return fail("bad worker arguments");
        };
        return match runtime.block_on(worker(backend, &store, &journal, seed, generation)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(v) => fail(&v.0),
        };
    }

    let mut backend = None;
    let mut duration = Duration::from_secs(60 * 60);
    let mut dir = None;
    let mut seed = 1u64;
    let mut kill = (Duration::from_millis(200), Duration::from_millis(2000));
    let mut url = None;
    let mut restart_cmd = None;
    let mut restart_every = 10u64;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            return fail(USAGE);
        };
        match flag.as_str() {
            "--backend" => backend = Backend::parse(value),
            "--minutes" => match value.parse::<f64>() {
                Ok(m) if m > 0.0 => duration = Duration::from_secs_f64(m * 60.0),
                _ => return fail(USAGE),
            },
            "--seconds" => match value.parse::<f64>() {
                Ok(s) if s > 0.0 => duration = Duration::from_secs_f64(s),
                _ => return fail(USAGE),
            },
            "--dir" => dir = Some(PathBuf::from(value)),
            "--seed" => match value.parse() {
                Ok(s) => seed = s,
                Err(_) => return fail(USAGE),
            },
            "--kill-ms" => {
                let parsed = value
                    .split_once("..")
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
                match parsed {
                    Some((a, b)) if a < b => {
                        kill = (Duration::from_millis(a), Duration::from_millis(b));
                    }
                    _ => return fail(USAGE),
                }
            }
            "--url" => url = Some(value.clone()),
            "--restart-cmd" => restart_cmd = Some(value.clone()),
            "--restart-every" => match value.parse::<u64>() {
                Ok(n) if n > 0 => restart_every = n,
                _ => return fail(USAGE),
            },
            _ => return fail(USAGE),
        }
    }
    let Some(backend) = backend else {
        return fail(USAGE);
    };
    if (backend == Backend::Postgres) != url.is_some() {
        return fail("--url is needed with --backend postgres, and only there");
    }
    let Ok(exe) = std::env::current_exe() else {
        return fail("cannot find my own executable");
    };
    // Keep a temp dir alive for the run when no --dir is given.
    let temp = match &dir {
        Some(_) => None,
        None => match tempfile::Builder::new().prefix("keyclaim-soak-").tempdir() {
            Ok(t) => Some(t),
            Err(e) => return fail(&format!("no temp dir: {e}")),
        },
    };
    let dir = dir.unwrap_or_else(|| {
        temp.as_ref()
            .map(|t| t.path().to_owned())
            .unwrap_or_default()
    });
    let config = SoakConfig {
        backend,
        dir,
        duration,
        seed,
        kill_min: kill.0,
        kill_max: kill.1,
        worker_exe: exe,
        location: url,
        restart: restart_cmd.map(|command| Restart {
            command,
            every: restart_every,
        }),
    };
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "soak {backend}: {:.1} min in {}, seed {seed}, SIGKILL every {:?}..{:?}",
        duration.as_secs_f64() / 60.0,
        config.dir.display(),
        kill.0,
        kill.1
    );
    // Violations are printed as soon as a progress line finds them, so that
    // a long run can be stopped and looked into without waiting for its end.
    let mut printed = 0;
    let result = runtime.block_on(run(&config, |s| {
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "{}", s.line(backend));
        for v in s.violation_samples.iter().skip(printed) {
            let _ = writeln!(stdout, "  violation: {v}");
        }
        printed = s.violation_samples.len();
    }));
    match result {
        Ok(summary) => {
            let _ = writeln!(out, "{}", summary.line(backend));
            for v in summary.violation_samples.iter().skip(printed) {
                let _ = writeln!(out, "  violation: {v}");
            }
            if summary.violations == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(v) => fail(&v.0),
    }
}
