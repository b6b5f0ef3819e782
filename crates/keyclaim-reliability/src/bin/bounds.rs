//! Measures the resource-bound cases of `keyclaim_reliability::bounds`:
//! each in its own process, printing a table of outcome, time and peak
//! memory growth. A benchmark-style run, not a test.
//!
//! ```text
//! cargo run --release -p keyclaim-reliability --bin bounds            # every case
//! cargo run --release -p keyclaim-reliability --bin bounds -- CASE    # one case, in this process
//! ```

use std::io::Write as _;
use std::process::{Command, ExitCode};

use keyclaim_reliability::bounds::{all_cases, run_case};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = std::io::stdout().lock();
    if let Some(case) = args.first() {
        return match run_case(case) {
            Ok(r) => {
                let _ = writeln!(
                    out,
                    "{}\t{}\t{}\t{:.1}\t{}\t{}",
                    r.case,
                    r.input,
                    r.outcome,
                    r.elapsed.as_secs_f64() * 1000.0,
                    r.peak_growth_kib
                        .map_or("n/a".to_owned(), |k| k.to_string()),
                    r.rss_before_kib.map_or("n/a".to_owned(), |k| k.to_string()),
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "bounds: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Ok(exe) = std::env::current_exe() else {
        let _ = writeln!(std::io::stderr(), "bounds: cannot find my own executable");
        return ExitCode::FAILURE;
    };
    let _ = writeln!(
        out,
        "| case | input | outcome | time (ms) | peak RSS growth during the call (KiB) | RSS before (KiB, input included) |"
    );
    let _ = writeln!(out, "| --- | --- | --- | ---: | ---: | ---: |");
    let mut failed = false;
    for case in all_cases() {
        match Command::new(&exe).arg(case).output() {
            Ok(o) if o.status.success() => {
                let line = String::from_utf8_lossy(&o.stdout);
                let cells: Vec<&str> = line.trim_end().split('\t').collect();
                let _ = writeln!(out, "| {} |", cells.join(" | "));
            }
            Ok(o) => {
                failed = true;
                let _ = writeln!(
                    out,
                    "| {case} | | FAILED ({}): {} | | | |",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            Err(e) => {
                failed = true;
                let _ = writeln!(out, "| {case} | | cannot run: {e} | | | |");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
