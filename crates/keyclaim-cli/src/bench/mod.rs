//! `keyclaim bench`: the backend comparison on a homeserver-shaped workload.

mod report;
mod scale;
mod split;
mod stats;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use keyclaim::KeyStore;
use keyclaim_benches::baseline::Baseline;

use report::{BackendReport, Invariants, RaceReport, RaceSide, Report};
use workload::{Claimer, Workload};

pub(crate) use workload::{device, upload_of};

/// Options of `keyclaim bench`.
#[derive(Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Backends to run, comma separated: memory, kv-memory, sqlite, redb, postgres
    /// (postgres needs --postgres or KEYCLAIM_POSTGRES_URL).
    #[arg(long, value_delimiter = ',', default_value = "memory,sqlite,redb")]
    pub(crate) backend: Vec<String>,
    /// Devices, each with --keys one-time keys and a fallback key.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) devices: usize,
    /// One-time keys per device at the start (and the refill target).
    #[arg(long, default_value_t = 50)]
    pub(crate) keys: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub(crate) clients: usize,
    /// Seconds of the mixed phase per backend.
    #[arg(long, default_value_t = 6.0)]
    pub(crate) duration: f64,
    /// Stop the mixed phase after this many operations instead of after --duration.
    #[arg(long)]
    pub(crate) ops: Option<u64>,
    /// Seconds each claim race may take at most.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) race_duration: f64,
    /// Hot devices (20% of single claims go to them).
    #[arg(long, default_value_t = 8)]
    pub(crate) hot: usize,
    /// Devices in one big-room bulk claim.
    #[arg(long, default_value_t = 1000)]
    pub(crate) bulk: usize,
    /// PostgreSQL URL for the postgres backend (or KEYCLAIM_POSTGRES_URL).
    #[arg(long, env = "KEYCLAIM_POSTGRES_URL")]
    pub(crate) postgres: Option<String>,
    /// Directory for the embedded backends' files (default: a temp dir, removed after).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Write the machine-readable report here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Write an SVG chart here.
    #[arg(long)]
    pub(crate) svg: Option<PathBuf>,
    /// Skip the baselines.
    #[arg(long)]
    pub(crate) no_baseline: bool,
    /// Run the scale benchmark instead: claim and upload latency at 10^4 ..
    /// --scale-max stored keys.
    #[arg(long)]
    pub(crate) scale: bool,
    /// Largest store size of the scale benchmark.
    #[arg(long, default_value_t = 10_000_000)]
    pub(crate) scale_max: u64,
    /// No progress bars.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// A backend under test: its store and the reference homeserver's claim
/// pattern on the same kind of storage.
pub(crate) struct BackendUnderTest {
    pub(crate) name: String,
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) baseline: Option<Arc<dyn Baseline>>,
}

pub(crate) async fn open_backend(
    name: &str,
    dir: &std::path::Path,
    args: &BenchArgs,
    tag: &str,
) -> Result<BackendUnderTest, String> {
    let _ = (dir, tag);
    let err = |e: keyclaim::Error| format!("{name}: {e}");
    match name {
        "memory" => Ok(BackendUnderTest {
            name: name.into(),
            store: Arc::new(keyclaim_memory::MemoryStore::new()),
            baseline: None,
        }),
        "kv-memory" => Ok(BackendUnderTest {
            name: name.into(),
            store: Arc::new(
                keyclaim_kv::KvStore::open(keyclaim_kv::MemoryEngine::new())
                    .await
                    .map_err(err)?,
            ),
            baseline: None,
        }),
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            let path = dir.join(format!("bench-{tag}.sqlite"));
            let store: Arc<dyn KeyStore> = Arc::new(
                keyclaim_sqlite::SqliteStore::open(&path)
                    .await
                    .map_err(err)?,
            );
            let baseline = if args.no_baseline {
                None
            } else {
                let path = dir.join(format!("bench-{tag}-baseline.sqlite"));
                Some(baselines::sqlite(&path).await.map_err(err)?)
            };
            Ok(BackendUnderTest {
                name: name.into(),
                store,
                baseline,
            })
        }
        #[cfg(feature = "redb")]
        "redb" => {
            let path = dir.join(format!("bench-{tag}.redb"));
            let store = Arc::new(keyclaim_redb::RedbStore::open(&path).await.map_err(err)?);
            let baseline = if args.no_baseline {
                None
            } else {
                Some(
                    baselines::redb(&dir.join(format!("bench-{tag}-baseline.redb")))
                        .await
                        .map_err(err)?,
                )
            };
            Ok(BackendUnderTest {
                name: name.into(),
                store,
                baseline,
            })
        }
        #[cfg(feature = "postgres")]
        "postgres" => {
            let url = args
                .postgres
                .as_deref()
                .ok_or("postgres: give --postgres URL or KEYCLAIM_POSTGRES_URL")?;
            let schema = format!("keyclaim_bench_{tag}_{}", std::process::id());
            let pool_size = args.clients.clamp(4, 64);
            let (store_url, options) =
                keyclaim_postgres::PostgresOptions::from_url(url).map_err(err)?;
            let options = options.schema(schema.clone()).pool_size(pool_size);
            let store = Arc::new(
                keyclaim_postgres::PostgresStore::connect_with(&store_url, options)
                    .await
                    .map_err(err)?,
            );
            let baseline = if args.no_baseline {
                None
            } else {
                let schema = format!("{schema}_baseline");
                Some(
                    baselines::postgres(&store_url, &schema, pool_size)
                        .await
                        .map_err(err)?,
                )
            };
            Ok(BackendUnderTest {
                name: name.into(),
                store,
                baseline,
            })
        }
        other => {
            let _ = (err, args);
            Err(format!(
                "unknown or not built backend {other:?} (built: {})",
                built_backends().join(", ")
            ))
        }
    }
}

#[cfg(any(feature = "sqlite", feature = "redb", feature = "postgres"))]
mod baselines;

pub(crate) fn built_backends() -> Vec<&'static str> {
    let mut v = vec!["memory", "kv-memory"];
    if cfg!(feature = "sqlite") {
        v.push("sqlite");
    }
    if cfg!(feature = "redb") {
        v.push("redb");
    }
    if cfg!(feature = "postgres") {
        v.push("postgres");
    }
    v
}

fn bar(quiet: bool, len: u64, msg: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:<28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_owned());
    pb
}

/// Runs the benchmark; returns whether every invariant held.
pub(crate) async fn run(args: BenchArgs) -> Result<bool, String> {
    if args.scale {
        return scale::run(&args).await;
    }
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            tmp.path().to_owned()
        }
    };
    let w = Workload {
        devices: args.devices.max(1),
        keys_per_device: args.keys,
        clients: args.clients.max(1),
        hot_devices: args.hot,
        duration: Duration::from_secs_f64(args.duration),
        max_ops: args.ops,
        bulk_size: args.bulk,
    };
    let mut report = Report {
        devices: w.devices,
        keys_per_device: w.keys_per_device,
        clients: w.clients,
        duration_secs: args.duration,
        backends: Vec::new(),
    };
    for name in &args.backend {
        let b = open_backend(name, &dir, &args, "main").await?;
        report.backends.push(
            run_backend(b, &w, &args)
                .await
                .map_err(|e| format!("{name}: {e}"))?,
        );
    }
    println!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("JSON report written to {}", path.display());
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report.svg()).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("SVG chart written to {}", path.display());
    }
    let ok = report.ok();
    println!(
        "{}",
        if ok {
            "all invariants held"
        } else {
            "INVARIANT VIOLATIONS: see above"
        }
    );
    Ok(ok)
}

async fn run_backend(
    b: BackendUnderTest,
    w: &Workload,
    args: &BenchArgs,
) -> keyclaim::Result<BackendReport> {
    let mut out = BackendReport {
        backend: b.name.clone(),
        ..Default::default()
    };
    // Set-up: every device uploads its keys and a fallback key.
    let pb = bar(
        args.quiet,
        w.devices as u64,
        &format!("{}: set-up uploads", b.name),
    );
    let t0 = Instant::now();
    let tick = pb.clone();
    workload::fill(
        &b.store,
        "u",
        w.devices,
        w.keys_per_device,
        w.clients,
        move || tick.inc(1),
    )
    .await?;
    out.setup_keys_per_sec =
        (w.devices * (w.keys_per_device + 1)) as f64 / t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    // The mixed phase.
    let spinner = bar(
        args.quiet,
        w.duration.as_secs().max(1),
        &format!("{}: mixed workload", b.name),
    );
    let ticker = {
        let s = spinner.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                s.inc(1);
            }
        })
    };
    let mixed = workload::mixed(b.store.clone(), "u", w).await?;
    ticker.abort();
    spinner.finish_and_clear();
    out.mixed = workload::KINDS
        .iter()
        .zip(&mixed.samples)
        .map(|(k, s)| ((*k).to_owned(), s.summary(mixed.elapsed)))
        .collect();
    out.invariants = Invariants {
        otks_issued: mixed.otks_issued,
        fallbacks_issued: mixed.fallbacks_issued,
        keys_issued_twice: mixed.duplicates,
        devices_with_wrong_count: mixed.count_mismatches,
        rejected_by_limit: mixed.rejected_by_limit,
        errors: mixed.errors,
    };
    // Claim races: keyclaim against the baseline, on fresh devices each,
    // with the most keys the store's limit allows: races start equal.
    let race_time = Duration::from_secs_f64(args.race_duration);
    let keys = usize::try_from(b.store.limits().max_otks_per_device_algorithm)
        .unwrap_or(500)
        .min(500);
    for (scenario, devices) in [("hot", 1), ("distinct", w.clients)] {
        let race = Race {
            devices,
            keys,
            clients: w.clients,
            duration: race_time,
        };
        let ours = race_side(Claimer::Store(b.store.clone()), "keyclaim", scenario, &race).await?;
        let base = match &b.baseline {
            Some(base) => Some(
                race_side(
                    Claimer::Baseline(base.clone()),
                    base.name(),
                    &format!("{scenario}b"),
                    &race,
                )
                .await?,
            ),
            None => None,
        };
        out.races.push(RaceReport {
            scenario: scenario.into(),
            clients: w.clients,
            keyclaim: ours,
            baseline: base,
        });
    }
    out.split = Some(split::run(&b.store, w.bulk_size.max(1), w.clients).await?);
    Ok(out)
}

/// The shape of one claim race.
struct Race {
    /// Fresh devices claimed from.
    devices: usize,
    /// One-time keys of each device at the start.
    keys: usize,
    /// Concurrent claimers.
    clients: usize,
    /// The longest the race may take.
    duration: Duration,
}

async fn race_side(
    claimer: Claimer,
    name: &str,
    scenario: &str,
    race: &Race,
) -> keyclaim::Result<RaceSide> {
    let prefix = format!("race-{scenario}-");
    let fillers = race.clients.min(race.devices);
    claimer
        .fill(&prefix, race.devices, race.keys, fillers)
        .await?;
    let list = (0..race.devices)
        .map(|i| device(&prefix, i))
        .collect::<keyclaim::Result<Vec<_>>>()?;
    let r = workload::race(claimer, list, race.clients, race.duration).await;
    Ok(RaceSide {
        name: name.into(),
        claims: r.samples.summary(r.elapsed),
        short_claims: r.short,
        keys_issued_twice: r.duplicates,
        errors: r.errors,
    })
}
