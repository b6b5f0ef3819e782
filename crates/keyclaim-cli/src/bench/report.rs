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

/// A claim race, keyclaim against a baseline.
#[derive(Debug, Default, Serialize)]
pub(crate) struct RaceReport {
    pub(crate) scenario: String,
    pub(crate) clients: usize,
    pub(crate) keyclaim: RaceSide,
    pub(crate) baseline: Option<RaceSide>,
}

/// One side of a race.
#[derive(Debug, Default, Serialize, Clone)]
pub(crate) struct RaceSide {
    pub(crate) name: String,
    pub(crate) claims: Summary,
    pub(crate) short_claims: u64,
    pub(crate) keys_issued_twice: u64,
    pub(crate) errors: u64,
}

impl RaceReport {
    pub(crate) fn ratio(&self) -> Option<f64> {
        let b = self.baseline.as_ref()?;
        (b.claims.ops_per_sec > 0.0)
            .then(|| self.keyclaim.claims.ops_per_sec / b.claims.ops_per_sec)
    }
}

/// The whole run.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) devices: usize,
    pub(crate) keys_per_device: usize,
    pub(crate) clients: usize,
    pub(crate) duration_secs: f64,
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
        let _ = writeln!(
            s,
            "\nclaim races (single-key claims until the keys run out or time is up):\n"
        );
        let _ = writeln!(
            s,
            "{:<10} {:<9} {:>3} {:>11} {:>9} {:>6} {:>11} {:>9} {:>6} {:>8}",
            "backend",
            "scenario",
            "C",
            "keyclaim/s",
            "p50 ms",
            "short",
            "baseline/s",
            "p50 ms",
            "short",
            "ratio"
        );
        for b in &self.backends {
            for r in &b.races {
                let (bs, bp, bshort) =
                    r.baseline
                        .as_ref()
                        .map_or(("-".into(), "-".into(), "-".into()), |x| {
                            (
                                format!("{:.0}", x.claims.ops_per_sec),
                                format!("{:.3}", x.claims.p50_ms),
                                x.short_claims.to_string(),
                            )
                        });
                let ratio = r.ratio().map_or("-".into(), |x| format!("{x:.1}x"));
                let _ = writeln!(
                    s,
                    "{:<10} {:<9} {:>3} {:>11.0} {:>9.3} {:>6} {:>11} {:>9} {:>6} {:>8}",
                    b.backend,
                    r.scenario,
                    r.clients,
                    r.keyclaim.claims.ops_per_sec,
                    r.keyclaim.claims.p50_ms,
                    r.keyclaim.short_claims,
                    bs,
                    bp,
                    bshort,
                    ratio
                );
            }
        }
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
                && b.races
                    .iter()
                    .all(|r| r.keyclaim.keys_issued_twice == 0 && r.keyclaim.short_claims == 0)
        })
    }

    /// A bar chart: claims per second per backend and race, keyclaim next to
    /// its baseline, on a log scale.
    pub(crate) fn svg(&self) -> String {
        let bars: Vec<(String, f64, f64)> = self
            .backends
            .iter()
            .flat_map(|b| {
                b.races.iter().map(move |r| {
                    (
                        format!("{} {} C={}", b.backend, r.scenario, r.clients),
                        r.keyclaim.claims.ops_per_sec,
                        r.baseline.as_ref().map_or(0.0, |x| x.claims.ops_per_sec),
                    )
                })
            })
            .collect();
        let max = bars.iter().map(|b| b.1.max(b.2)).fold(1.0, f64::max);
        let log_max = max.log10().ceil().max(1.0);
        let (left, row, width) = (190.0, 34.0, 520.0);
        let height = 70.0 + row * bars.len() as f64 + 30.0;
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
            r#"<text x="10" y="20" font-size="15" font-weight="bold">Claims per second (log scale): keyclaim vs one-transaction-per-claim baseline</text>"#
        );
        let _ = writeln!(
            s,
            r##"<rect x="10" y="32" width="12" height="12" fill="#2b6cb0"/><text x="27" y="43">keyclaim</text><rect x="100" y="32" width="12" height="12" fill="#c05621"/><text x="117" y="43">baseline</text>"##
        );
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
        for (i, (label, ours, base)) in bars.iter().enumerate() {
            let y = 60.0 + row * i as f64;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + 17.0,
                escape(label)
            );
            let _ = writeln!(
                s,
                r##"<rect x="{left}" y="{y:.1}" width="{:.1}" height="13" fill="#2b6cb0"/><text x="{:.1}" y="{:.1}">{ours:.0}</text>"##,
                x(*ours) - left,
                x(*ours) + 4.0,
                y + 11.0
            );
            if *base > 0.0 {
                let _ = writeln!(
                    s,
                    r##"<rect x="{left}" y="{:.1}" width="{:.1}" height="13" fill="#c05621"/><text x="{:.1}" y="{:.1}">{base:.0}</text>"##,
                    y + 15.0,
                    x(*base) - left,
                    x(*base) + 4.0,
                    y + 26.0
                );
            }
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
