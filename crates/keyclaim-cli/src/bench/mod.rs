//! `keyclaim bench`: the backend comparison on a homeserver-shaped workload.

mod race;
mod report;
mod scale;
mod server;
mod split;
mod stats;
mod workload;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use keyclaim::KeyStore;
use keyclaim_benches::baseline::Baseline;

use race::RaceSpec;
use report::{BackendReport, Invariants, RaceReport, RaceSide, Report, Spread};
use workload::{Claimer, Workload};

pub(crate) use workload::{device, upload_of};

/// Options of `keyclaim bench`.
#[derive(Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Backends to run, comma separated (default: every built backend:
    /// memory, kv-memory, sqlite, redb, postgres, and rocksdb when built
    /// with the `rocksdb` feature). postgres runs on --postgres URL, else
    /// on a throwaway durable server the bench starts from the installed
    /// PostgreSQL binaries; without either it is left out.
    #[arg(long, value_delimiter = ',')]
    pub(crate) backend: Option<Vec<String>>,
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
    /// Seconds of each claim race's measured window (after its warm-up).
    #[arg(long, alias = "race-duration", default_value_t = 1.0)]
    pub(crate) race_window: f64,
    /// Seconds of each claim race's unmeasured warm-up.
    #[arg(long, default_value_t = 0.3)]
    pub(crate) race_warmup: f64,
    /// Repetitions of each claim race (fresh devices each).
    #[arg(long, default_value_t = 3)]
    pub(crate) race_reps: usize,
    /// One-time keys of keyclaim's device in the one and hot races at the
    /// start, and what its uploader tops it up to (the distinct race's
    /// devices and the baselines' devices get 500 each). The stores are
    /// opened with their per-device cap (R8.1) raised to this: 64 claimers
    /// take 500 keys of a fast store in about a millisecond, less than the
    /// uploader may wait for a turn on a busy machine.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) race_keys: usize,
    /// The claim races to run, comma separated: one (1 client, 1 device),
    /// hot (every client on 1 device), distinct (a device per client).
    #[arg(long, value_delimiter = ',', default_value = "one,hot,distinct", value_parser = ["one", "hot", "distinct"])]
    pub(crate) races: Vec<String>,
    /// Hot devices (20% of single claims go to them).
    #[arg(long, default_value_t = 8)]
    pub(crate) hot: usize,
    /// Devices in one big-room bulk claim.
    #[arg(long, default_value_t = 1000)]
    pub(crate) bulk: usize,
    /// PostgreSQL URL for the postgres backend (or KEYCLAIM_POSTGRES_URL);
    /// without it the bench starts a throwaway server if it can.
    #[arg(long, env = "KEYCLAIM_POSTGRES_URL")]
    pub(crate) postgres: Option<String>,
    /// Leave PostgreSQL out (no server is started).
    #[arg(long)]
    pub(crate) no_postgres: bool,
    /// Connections of each PostgreSQL pool: keyclaim's store's and each
    /// baseline's alike (default: one per core of this machine plus one, at
    /// most --clients: keyclaim's store keeps the one more for big rooms'
    /// claims and lends it to claims while none runs; PostgreSQL serves a
    /// few active connections per core best, and more only share its cores
    /// among more statements).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) pool: Option<u16>,
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

impl BenchArgs {
    /// The connections of each PostgreSQL pool: `--pool`, else one per
    /// core of this machine plus one, at most one per client.
    pub(crate) fn postgres_pool(&self) -> usize {
        self.pool.map_or_else(
            || {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                (cores + 1).min(self.clients.max(1))
            },
            usize::from,
        )
    }
}

/// A backend under test: its store and the baselines it races against
/// (the reference homeserver's claim pattern on the same kind of storage,
/// and for PostgreSQL also one claim per transaction).
pub(crate) struct BackendUnderTest {
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) baselines: Vec<Arc<dyn Baseline>>,
}

/// What an opener gets: where files go, the options, a tag that keeps one
/// run's files and schemas apart from another's, the PostgreSQL server.
pub(crate) struct Setting<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) args: &'a BenchArgs,
    pub(crate) tag: &'a str,
    /// Read by the PostgreSQL opener and clean-up only.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) postgres: Option<&'a str>,
}

impl Setting<'_> {
    /// A file of this run in the bench's directory.
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("bench-{}-{name}", self.tag))
    }

    /// The stores' limits: the defaults, with the per-device cap (R8.1)
    /// raised to hold the races' devices (`--race-keys`).
    fn limits(&self) -> keyclaim::Limits {
        let mut limits = keyclaim::Limits::default();
        let race_keys = u64::try_from(self.args.race_keys).unwrap_or(u64::MAX);
        limits.max_otks_per_device_algorithm = limits.max_otks_per_device_algorithm.max(race_keys);
        limits
    }
}

type Opened<'a> = Pin<Box<dyn Future<Output = keyclaim::Result<BackendUnderTest>> + Send + 'a>>;

/// Opens one backend of the bench.
type Opener = for<'a> fn(&'a Setting<'a>) -> Opened<'a>;

/// The backends `keyclaim bench` knows, in the order they run: a new
/// backend is one line here and an opener below.
const BACKENDS: &[(&str, Opener)] = &[
    ("memory", |s| Box::pin(memory(s))),
    ("kv-memory", |s| Box::pin(kv_memory(s))),
    #[cfg(feature = "sqlite")]
    ("sqlite", |s| Box::pin(sqlite(s))),
    #[cfg(feature = "redb")]
    ("redb", |s| Box::pin(redb(s))),
    #[cfg(feature = "postgres")]
    ("postgres", |s| Box::pin(postgres(s))),
    // Present when keyclaim-open and keyclaim-benches were built with
    // RocksDB (this crate's `rocksdb` feature, or `cargo test --workspace`,
    // where keyclaim-rocksdb's tests turn it on); see `built_backends`.
    ("rocksdb", |s| Box::pin(rocksdb(s))),
];

/// Whether this build has the RocksDB backend and its baseline.
fn rocksdb_built() -> bool {
    keyclaim_open::Scheme::Rocksdb.is_built() && keyclaim_benches::baseline::ROCKSDB
}

async fn rocksdb(s: &Setting<'_>) -> keyclaim::Result<BackendUnderTest> {
    let url = format!("rocksdb:{}", s.file("store.rocksdb").display());
    let store = keyclaim_open::open_with(&url, s.limits()).await?;
    let mut baselines = Vec::new();
    if !s.args.no_baseline {
        let baseline = keyclaim_benches::baseline::open_rocksdb(&s.file("baseline.rocksdb"))
            .await
            .ok_or_else(|| {
                keyclaim::Error::invalid_config("this build has no RocksDB baseline")
            })??;
        baselines.push(baseline);
    }
    Ok(BackendUnderTest { store, baselines })
}

async fn memory(s: &Setting<'_>) -> keyclaim::Result<BackendUnderTest> {
    Ok(BackendUnderTest {
        store: Arc::new(keyclaim_memory::MemoryStore::with_limits(s.limits())),
        baselines: Vec::new(),
    })
}

async fn kv_memory(s: &Setting<'_>) -> keyclaim::Result<BackendUnderTest> {
    let options = keyclaim_kv::KvOptions::new().limits(s.limits());
    let store = keyclaim_kv::KvStore::open_with(keyclaim_kv::MemoryEngine::new(), options).await?;
    Ok(BackendUnderTest {
        store: Arc::new(store),
        baselines: Vec::new(),
    })
}

#[cfg(feature = "sqlite")]
async fn sqlite(s: &Setting<'_>) -> keyclaim::Result<BackendUnderTest> {
    let options = keyclaim_sqlite::SqliteOptions::new().limits(s.limits());
    let store = keyclaim_sqlite::SqliteStore::open_with(&s.file("store.sqlite"), options).await?;
    let mut baselines = Vec::new();
    if !s.args.no_baseline {
        baselines.push(baselines::sqlite(&s.file("baseline.sqlite")).await?);
    }
    Ok(BackendUnderTest {
        store: Arc::new(store),
        baselines,
    })
}

#[cfg(feature = "redb")]
async fn redb(s: &Setting<'_>) -> keyclaim::Result<BackendUnderTest> {
    let options = keyclaim_redb::RedbOptions::new().limits(s.limits());
    let store = keyclaim_redb::RedbStore::open_with(&s.file("store.redb"), options).await?;
    let mut baselines = Vec::new();
    if !s.args.no_baseline {
        baselines.push(baselines::redb(&s.file("baseline.redb")).await?);
    }
    Ok(BackendUnderTest {
        store: Arc::new(store),
        baselines,
    })
}

/// The schemas of one PostgreSQL run tagged `tag`: the store's, the
/// reference statement's and the row-lock baseline's.
#[cfg(feature = "postgres")]
fn postgres_schemas(tag: &str) -> [String; 3] {
    let schema = format!("keyclaim_bench_{tag}_{}", std::process::id());
    [
        format!("{schema}_baseline"),
        format!("{schema}_rowlock"),
        schema,
    ]
}

/// A PostgreSQL connection string without keyclaim's options, and those
/// options: a store URL may carry them (`?keyclaim_...`); a `key=value`
/// connection string carries none.
#[cfg(feature = "postgres")]
fn split_postgres_url(url: &str) -> keyclaim::Result<(String, keyclaim_postgres::PostgresOptions)> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        keyclaim_postgres::PostgresOptions::from_url(url)
    } else {
        Ok((url.to_owned(), keyclaim_postgres::PostgresOptions::new()))
    }
}

/// What a backend's run leaves behind that is not the bench's own: the
/// schemas a PostgreSQL run made on the server of `s` (which may be the
/// caller's, kept after the run) are dropped. A failure is reported, not
/// fatal.
pub(crate) async fn clean_up(name: &str, s: &Setting<'_>) {
    #[cfg(feature = "postgres")]
    if let (true, Some(url)) = (name == "postgres", s.postgres) {
        let schemas = postgres_schemas(s.tag);
        let names: Vec<&str> = schemas.iter().map(String::as_str).collect();
        let dropped = match split_postgres_url(url) {
            Ok((url, _)) => keyclaim_benches::baseline::drop_schemas(&url, &names).await,
            Err(e) => Err(e),
        };
        if let Err(e) = dropped {
            eprintln!(
                "could not drop the bench's schemas {}: {e}",
                names.join(", ")
            );
        }
    }
    #[cfg(not(feature = "postgres"))]
    let _ = (name, s);
}

#[cfg(feature = "postgres")]
async fn postgres(s: &Setting<'_>) -> keyclaim::Result<BackendUnderTest> {
    let url = s
        .postgres
        .ok_or_else(|| keyclaim::Error::storage("bench", "open", false, "no PostgreSQL server"))?;
    let [baseline_schema, row_lock_schema, schema] = postgres_schemas(s.tag);
    let pool_size = s.args.postgres_pool();
    let (url, options) = split_postgres_url(url)?;
    let url = url.as_str();
    let options = options
        .schema(schema.clone())
        .pool_size(pool_size)
        .limits(s.limits());
    let store = keyclaim_postgres::PostgresStore::connect_with(url, options).await?;
    let mut baselines = Vec::new();
    if !s.args.no_baseline {
        baselines.push(baselines::postgres(url, &baseline_schema, pool_size).await?);
        baselines.push(baselines::postgres_row_lock(url, &row_lock_schema, pool_size).await?);
    }
    Ok(BackendUnderTest {
        store: Arc::new(store),
        baselines,
    })
}

#[cfg(any(feature = "sqlite", feature = "redb", feature = "postgres"))]
mod baselines;

/// The backends this build has, in the order they run.
pub(crate) fn built_backends() -> Vec<&'static str> {
    BACKENDS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| *name != "rocksdb" || rocksdb_built())
        .collect()
}

/// Opens backend `name`.
pub(crate) async fn open_backend(
    name: &str,
    setting: &Setting<'_>,
) -> Result<BackendUnderTest, String> {
    let (_, open) = BACKENDS
        .iter()
        .find(|(n, _)| *n == name && built_backends().contains(n))
        .ok_or_else(|| unknown_backend(name))?;
    open(setting).await.map_err(|e| format!("{name}: {e}"))
}

fn unknown_backend(name: &str) -> String {
    format!(
        "unknown or not built backend {name:?} (built: {})",
        built_backends().join(", ")
    )
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

/// Runs the benchmark; returns whether every invariant held. A throwaway
/// PostgreSQL server it starts is stopped and removed at the end, also
/// after an error or an interrupt.
pub(crate) async fn run(args: BenchArgs) -> Result<bool, String> {
    let requested = args.backend.clone();
    let mut names: Vec<String> = requested
        .clone()
        .unwrap_or_else(|| built_backends().into_iter().map(String::from).collect());
    if let Some(unknown) = names
        .iter()
        .find(|n| !built_backends().contains(&n.as_str()))
    {
        return Err(unknown_backend(unknown));
    }
    let mut interrupts = server::Interrupts::watch();
    let mut server = None;
    if names.iter().any(|n| n == "postgres") {
        let binaries = keyclaim_pgserver::find_bin_dir().map_err(|e| e.to_string());
        let explicit = requested.is_some();
        let plan = server::plan(
            explicit,
            args.no_postgres,
            args.postgres.as_deref(),
            binaries,
        )?;
        server = server::Server::from_plan(plan).await?;
        if server.is_none() {
            names.retain(|n| n != "postgres");
        }
    }
    let url = server.as_ref().map(server::Server::url);
    let described = server.as_ref().map(server::Server::describe);
    let outcome = tokio::select! {
        r = run_backends(&args, &names, url.as_deref(), described) => r,
        signal = interrupts.next() => Err(format!("interrupted ({signal})")),
    };
    if let Some(server) = server {
        server.close().await;
    }
    outcome
}

async fn run_backends(
    args: &BenchArgs,
    names: &[String],
    postgres: Option<&str>,
    postgres_server: Option<String>,
) -> Result<bool, String> {
    if args.scale {
        return scale::run(args, names, postgres).await;
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
    let runs_postgres = names.iter().any(|n| n == "postgres");
    let mut report = Report {
        devices: w.devices,
        keys_per_device: w.keys_per_device,
        clients: w.clients,
        duration_secs: args.duration,
        postgres_server: postgres_server.filter(|_| runs_postgres),
        postgres_pool: runs_postgres.then(|| args.postgres_pool()),
        load_average_start: keyclaim_benches::load_average(),
        ..Default::default()
    };
    for name in names {
        let setting = Setting {
            dir: &dir,
            args,
            tag: "main",
            postgres,
        };
        let b = open_backend(name, &setting).await?;
        let result = run_backend(name, b, &w, args).await;
        clean_up(name, &setting).await;
        report
            .backends
            .push(result.map_err(|e| format!("{name}: {e}"))?);
    }
    report.load_average_end = keyclaim_benches::load_average();
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
    name: &str,
    b: BackendUnderTest,
    w: &Workload,
    args: &BenchArgs,
) -> keyclaim::Result<BackendReport> {
    let mut out = BackendReport {
        backend: name.to_owned(),
        ..Default::default()
    };
    // Set-up: every device uploads its keys and a fallback key.
    let pb = bar(
        args.quiet,
        w.devices as u64,
        &format!("{name}: set-up uploads"),
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
        &format!("{name}: mixed workload"),
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
    out.races = races(name, &b, w.clients, args).await?;
    out.split = Some(split::run(&b.store, w.bulk_size.max(1), w.clients).await?);
    Ok(out)
}

/// The claim races: one client on one device, every client on one hot
/// device, a device per client; keyclaim and each baseline in turn, each
/// repetition on fresh devices with the most keys the store's limit allows,
/// the order of the sides rotating from one repetition to the next so
/// that the machine's swings hit all alike.
async fn races(
    name: &str,
    b: &BackendUnderTest,
    clients: usize,
    args: &BenchArgs,
) -> keyclaim::Result<Vec<RaceReport>> {
    let per_device = |limits: &keyclaim::Limits| {
        usize::try_from(limits.max_otks_per_device_algorithm).unwrap_or(usize::MAX)
    };
    let cap = per_device(b.store.limits());
    let default_cap = per_device(&keyclaim::Limits::default());
    let sides: Vec<(String, Claimer)> =
        std::iter::once(("keyclaim".to_owned(), Claimer::Store(b.store.clone())))
            .chain(
                b.baselines
                    .iter()
                    .map(|x| (x.name().to_owned(), Claimer::Baseline(x.clone()))),
            )
            .collect();
    let reps = args.race_reps.max(1);
    let shapes = [
        ("one", 1, 1),
        ("hot", clients, 1),
        ("distinct", clients, clients),
    ];
    let pb = bar(
        args.quiet,
        (args.races.len() * reps * sides.len()) as u64,
        &format!("{name}: claim races"),
    );
    let mut out = Vec::new();
    for (scenario, clients, devices) in shapes {
        if !args.races.iter().any(|r| r == scenario) {
            continue;
        }
        // keyclaim's one device gets `--race-keys`; a device per client
        // gets the default cap (500), which lasts its share of the claims.
        // The baselines' devices hold the default cap, the most a
        // homeserver's device holds by default: the reference statement
        // numbers every key of a device it claims from, so larger devices
        // would only slow it.
        let specs: Vec<RaceSpec> = sides
            .iter()
            .map(|(_, side)| RaceSpec {
                clients,
                target: match side {
                    Claimer::Store(_) if devices == 1 => args.race_keys.min(cap),
                    Claimer::Store(_) => cap.min(default_cap),
                    Claimer::Baseline(_) => default_cap,
                },
                warmup: Duration::from_secs_f64(args.race_warmup),
                window: Duration::from_secs_f64(args.race_window),
            })
            .collect();
        let mut runs: Vec<Vec<race::RunResult>> = vec![Vec::new(); sides.len()];
        for rep in 0..reps {
            for k in 0..sides.len() {
                let j = (k + rep) % sides.len();
                let prefix = format!("race-{scenario}-{j}-{rep}-");
                let list = (0..devices)
                    .map(|i| device(&prefix, i))
                    .collect::<keyclaim::Result<Vec<_>>>()?;
                runs[j].push(race::run(&sides[j].1, list, &specs[j]).await?);
                pb.inc(1);
            }
        }
        let mut summed = sides
            .iter()
            .zip(runs)
            .zip(&specs)
            .map(|(((side, _), r), spec)| race_side(side, &r, spec));
        let keyclaim = summed.next().unwrap_or_default();
        out.push(RaceReport {
            scenario: scenario.into(),
            clients,
            devices,
            warmup_secs: args.race_warmup,
            window_secs: args.race_window,
            repetitions: reps,
            keyclaim,
            baselines: summed.collect(),
        });
    }
    pb.finish_and_clear();
    Ok(out)
}

/// One side's repetitions, summed up.
fn race_side(name: &str, runs: &[race::RunResult], spec: &RaceSpec) -> RaceSide {
    let window = spec.window;
    let secs = window.as_secs_f64();
    let rates: Vec<f64> = runs
        .iter()
        .map(|r| {
            if secs > 0.0 {
                r.window_claims as f64 / secs
            } else {
                0.0
            }
        })
        .collect();
    let mut samples = stats::Samples::default();
    for r in runs {
        samples.merge(r.samples.clone());
    }
    let dry: u64 = runs.iter().map(|r| r.dry).sum();
    RaceSide {
        name: name.to_owned(),
        keys_per_device: spec.target,
        refill_below: spec.threshold(),
        claims_per_sec: Spread::of(&rates),
        per_repetition: rates,
        claims: samples.summary(window * u32::try_from(runs.len()).unwrap_or(1)),
        short_claims: runs.iter().map(|r| r.short).sum(),
        dry_claims: dry,
        ran_dry: dry > 0,
        refills: runs.iter().map(|r| r.refills).sum(),
        keys_issued_twice: runs.iter().map(|r| r.duplicates).sum(),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::BenchArgs;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let argv = std::iter::once("bench").chain(args.iter().copied());
        match Command::try_parse_from(argv) {
            Ok(command) => command.args,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_postgres_pool_is_one_per_core_plus_one_and_at_most_one_per_client() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(parse(&[]).postgres_pool(), (cores + 1).min(64));
        assert_eq!(parse(&["--clients", "1"]).postgres_pool(), 1);
        assert_eq!(parse(&["--pool", "7"]).postgres_pool(), 7);
    }
}
