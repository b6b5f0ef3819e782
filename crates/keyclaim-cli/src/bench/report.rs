//! The benchmark report: a table for people, JSON for machines, an SVG chart.

use std::fmt::Write as _;

use serde::Serialize;

use super::stats::Summary;

/// One backend's results.
#[derive(Debug, Default, Serialize)]
pub(crate) struct BackendReport {
    pub(crate) backend: String,
    pub(crate) setup_keys_per_sec: f64,
    pub(crate) mixed: Vec<(String, Summary)>,
    pub(crate) invariants: Invariants,
    pub(crate) races: Vec<RaceReport>,
    pub(crate) split: Option<super::split::SplitReport>,
}

/// What was checked at the end of the mixed phase.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Invariants {
    pub(crate) otks_issued: u64,
    pub(crate) fallbacks_issued: u64,
    pub(crate) keys_issued_twice: u64,
    pub(crate) devices_with_wrong_count: u64,
    pub(crate) rejected_by_limit: u64,
    pub(crate) errors: u64,
}

impl Invariants {
    pub(crate) fn ok(&self) -> bool {
        self.keys_issued_twice == 0 && self.devices_with_wrong_count == 0 && self.errors == 0
    }
}

/// A claim race at steady state: keyclaim's store and the baselines, each
/// in the same race, repetition after repetition.
#[derive(Debug, Default, Serialize)]
pub(crate) struct RaceReport {
    /// `one` (one client, one device), `hot` (every client on one device)
    /// or `distinct` (a device per client).
    pub(crate) scenario: String,
    pub(crate) clients: usize,
    pub(crate) devices: usize,
    pub(crate) warmup_secs: f64,
    pub(crate) window_secs: f64,
    pub(crate) repetitions: usize,
    pub(crate) keyclaim: RaceSide,
    pub(crate) baselines: Vec<RaceSide>,
}

/// One side of a race, over every repetition.
#[derive(Debug, Default, Serialize, Clone)]
pub(crate) struct RaceSide {
    pub(crate) name: String,
    /// One-time keys of each device at the start, and what its uploader
    /// refills it to.
    pub(crate) keys_per_device: usize,
    /// The uploader refills when the device's count is below this.
    pub(crate) refill_below: usize,
    /// Claims that got a one-time key, per second of the window: the
    /// median, lowest and highest repetition.
    pub(crate) claims_per_sec: Spread,
    /// Each repetition's claims per second, in the order they ran.
    pub(crate) per_repetition: Vec<f64>,
    /// Every repetition's window together: claims, rate and latency.
    pub(crate) claims: Summary,
    /// Claims that came away without a one-time key while one was stored
    /// for the whole claim (R4.3).
    pub(crate) short_claims: u64,
    /// Claims that came away without a one-time key because the device had
    /// none: its uploader had fallen behind.
    pub(crate) dry_claims: u64,
    /// Whether any repetition had a dry claim (not steady state).
    pub(crate) ran_dry: bool,
    /// Refill uploads.
    pub(crate) refills: u64,
    pub(crate) keys_issued_twice: u64,
    pub(crate) errors: u64,
}

/// The median, lowest and highest of a few values.
#[derive(Debug, Default, Serialize, Clone, PartialEq)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Self {
        Self {
            median: keyclaim_benches::median(values.to_vec()),
            min: values.iter().copied().reduce(f64::min).unwrap_or(0.0),
            max: values.iter().copied().reduce(f64::max).unwrap_or(0.0),
        }
    }
}

impl RaceReport {
    /// keyclaim's median rate over `baseline`'s.
    pub(crate) fn ratio(&self, baseline: &RaceSide) -> Option<f64> {
        (baseline.claims_per_sec.median > 0.0)
            .then(|| self.keyclaim.claims_per_sec.median / baseline.claims_per_sec.median)
    }

    fn sides(&self) -> impl Iterator<Item = &RaceSide> {
        std::iter::once(&self.keyclaim).chain(&self.baselines)
    }
}

/// The whole run.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) devices: usize,
    pub(crate) keys_per_device: usize,
    pub(crate) clients: usize,
    pub(crate) duration_secs: f64,
    /// Where the PostgreSQL backend ran, if it did: the given server (its
    /// URL without the password) or the throwaway server the bench started.
    pub(crate) postgres_server: Option<String>,
    /// Connections of each PostgreSQL pool (keyclaim's and each
    /// baseline's), if PostgreSQL ran.
    pub(crate) postgres_pool: Option<usize>,
    /// The machine's load averages (1, 5, 15 minutes) at the start and at
    /// the end.
    pub(crate) load_average_start: String,
    pub(crate) load_average_end: String,
    pub(crate) backends: Vec<BackendReport>,
}

impl Report {
    pub(crate) fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nkeyclaim bench: {} devices x {} one-time keys + a fallback key, {} concurrent clients\n",
            self.devices, self.keys_per_device, self.clients
        );
        if let Some(pool) = self.postgres_pool {
            let _ = writeln!(
                s,
                "PostgreSQL: {pool} connections in each pool (keyclaim's store's and each baseline's)\n"
            );
        }
        let _ = writeln!(
            s,
            "{:<10} {:<18} {:>10} {:>10} {:>10}",
            "backend", "operation", "ops/s", "p50 ms", "p99 ms"
        );
        for b in &self.backends {
            let _ = writeln!(
                s,
                "{:<10} {:<18} {:>10.0} {:>10} {:>10}",
                b.backend, "setup (keys/s)", b.setup_keys_per_sec, "", ""
            );
            for (kind, m) in &b.mixed {
                let _ = writeln!(
                    s,
                    "{:<10} {:<18} {:>10.0} {:>10.3} {:>10.3}",
                    b.backend, kind, m.ops_per_sec, m.p50_ms, m.p99_ms
                );
            }
        }
        if let Some(r) = self.backends.iter().flat_map(|b| &b.races).next() {
            let _ = writeln!(
                s,
                "\nclaim races at steady state: single-key claims for a {}s window after a {}s warm-up, {} repetitions;\n\
                 each device starts with `keys` one-time keys and its uploader tops it up when its count is below 80% of that\n\
                 (claims/s: median and range of the repetitions; short: no key while one was stored; dry: the device had none):\n",
                r.window_secs, r.warmup_secs, r.repetitions
            );
        }
        let _ = writeln!(
            s,
            "{:<10} {:<9} {:>3} {:>3} {:>6} {:<18} {:>10} {:>21} {:>8} {:>8} {:>6} {:>6} {:>9}",
            "backend",
            "race",
            "C",
            "dev",
            "keys",
            "side",
            "claims/s",
            "(min - max)",
            "p50 ms",
            "p99 ms",
            "short",
            "dry",
            "keyclaim"
        );
        for b in &self.backends {
            for r in &b.races {
                for side in r.sides() {
                    let ratio = if std::ptr::eq(side, &r.keyclaim) {
                        String::new()
                    } else {
                        r.ratio(side).map_or("-".into(), |x| format!("{x:.1}x"))
                    };
                    let c = &side.claims_per_sec;
                    let _ = writeln!(
                        s,
                        "{:<10} {:<9} {:>3} {:>3} {:>6} {:<18} {:>10.0} {:>21} {:>8.3} {:>8.3} {:>6} {:>6} {:>9}",
                        b.backend,
                        r.scenario,
                        r.clients,
                        r.devices,
                        side.keys_per_device,
                        side.name,
                        c.median,
                        format!("({:.0} - {:.0})", c.min, c.max),
                        side.claims.p50_ms,
                        side.claims.p99_ms,
                        side.short_claims,
                        side.dry_claims,
                        ratio
                    );
                }
            }
        }
        let dry: Vec<String> = self
            .backends
            .iter()
            .flat_map(|b| {
                b.races.iter().flat_map(move |r| {
                    r.sides().filter(|x| x.ran_dry).map(move |x| {
                        format!("{} {} C={} {}", b.backend, r.scenario, r.clients, x.name)
                    })
                })
            })
            .collect();
        let _ = writeln!(
            s,
            "\nsteady state: {}",
            if dry.is_empty() {
                "no race ran dry".to_owned()
            } else {
                format!("ran dry (uploader behind): {}", dry.join(", "))
            }
        );
        let _ = writeln!(
            s,
            "\nsplit claim vs one-step claim, one request, 1 device in 10 with only a fallback key\n(split: store, application-service provider, fallback keys for the rest; always: with always_include_fallback_keys):\n"
        );
        let _ = writeln!(
            s,
            "{:<10} {:>8} {:>16} {:>14} {:>8} {:>15} {:>8}",
            "backend",
            "devices",
            "one-step p50 ms",
            "split p50 ms",
            "ratio",
            "always p50 ms",
            "ratio"
        );
        for b in &self.backends {
            if let Some(r) = &b.split {
                let _ = writeln!(
                    s,
                    "{:<10} {:>8} {:>16.3} {:>14.3} {:>7.2}x {:>15.3} {:>7.2}x",
                    b.backend,
                    r.devices,
                    r.one_step.p50_ms,
                    r.split.p50_ms,
                    r.ratio(&r.split),
                    r.always_include.p50_ms,
                    r.ratio(&r.always_include)
                );
            }
        }
        let _ = writeln!(s, "\ninvariants:");
        for b in &self.backends {
            let i = &b.invariants;
            let _ = writeln!(
                s,
                "  {:<10} {}: {} OTKs and {} fallback keys issued, {} issued twice, {} devices with a wrong count, {} uploads refused by the per-device limit, {} errors",
                b.backend,
                if i.ok() { "OK  " } else { "FAIL" },
                i.otks_issued,
                i.fallbacks_issued,
                i.keys_issued_twice,
                i.devices_with_wrong_count,
                i.rejected_by_limit,
                i.errors
            );
        }
        s
    }

    pub(crate) fn ok(&self) -> bool {
        self.backends.iter().all(|b| {
            b.invariants.ok()
                && b.races.iter().all(|r| {
                    r.keyclaim.keys_issued_twice == 0
                        && r.keyclaim.short_claims == 0
                        && r.keyclaim.errors == 0
                })
        })
    }

    /// A bar chart: claims per second per backend and race (medians),
    /// keyclaim next to its baselines, on a log scale.
    pub(crate) fn svg(&self) -> String {
        const COLORS: [&str; 3] = ["#2b6cb0", "#c05621", "#2f855a"];
        let rows: Vec<(String, Vec<f64>)> = self
            .backends
            .iter()
            .flat_map(|b| {
                b.races.iter().map(move |r| {
                    (
                        format!("{} {} C={}", b.backend, r.scenario, r.clients),
                        r.sides().map(|x| x.claims_per_sec.median).collect(),
                    )
                })
            })
            .collect();
        let max = rows
            .iter()
            .flat_map(|r| r.1.iter().copied())
            .fold(1.0, f64::max);
        let log_max = max.log10().ceil().max(1.0);
        let (left, bar_h, width) = (190.0, 13.0, 520.0);
        let row_h = |n: usize| 8.0 + bar_h * n.max(1) as f64 + 2.0 * n.saturating_sub(1) as f64;
        let height = 70.0 + rows.iter().map(|r| row_h(r.1.len())).sum::<f64>() + 30.0;
        let x = |v: f64| {
            left + if v >= 1.0 {
                width * v.log10() / log_max
            } else {
                0.0
            }
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
            w = left + width + 90.0
        );
        let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#fff"/>"##);
        let _ = writeln!(
            s,
            r#"<text x="10" y="20" font-size="15" font-weight="bold">Claims per second at steady state (median, log scale): keyclaim vs baselines</text>"#
        );
        let legend = [
            "keyclaim",
            "reference homeserver's pattern",
            "one claim per transaction (row lock)",
        ];
        let mut lx = 10.0;
        for (color, label) in COLORS.iter().zip(legend) {
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="32" width="12" height="12" fill="{color}"/><text x="{tx}" y="43">{label}</text>"#,
                tx = lx + 17.0,
                label = escape(label)
            );
            lx += 30.0 + 6.5 * label.len() as f64;
        }
        for decade in 0..=(log_max as i32) {
            let v = 10f64.powi(decade);
            let gx = x(v);
            let _ = writeln!(
                s,
                r##"<line x1="{gx:.1}" y1="55" x2="{gx:.1}" y2="{y2:.1}" stroke="#ddd"/><text x="{gx:.1}" y="{ty:.1}" text-anchor="middle" fill="#555">{v}</text>"##,
                y2 = height - 25.0,
                ty = height - 10.0
            );
        }
        let mut y = 60.0;
        for (label, values) in &rows {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + 11.0,
                escape(label)
            );
            for (i, v) in values.iter().enumerate() {
                let by = y + (bar_h + 2.0) * i as f64;
                let _ = writeln!(
                    s,
                    r#"<rect x="{left}" y="{by:.1}" width="{:.1}" height="{bar_h}" fill="{}"/><text x="{:.1}" y="{:.1}">{v:.0}</text>"#,
                    x(*v) - left,
                    COLORS[i % COLORS.len()],
                    x(*v) + 4.0,
                    by + 11.0
                );
            }
            y += row_h(values.len());
        }
        s.push_str("</svg>\n");
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
