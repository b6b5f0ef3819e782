#![doc = include_str!("../README.md")]

use std::collections::BTreeMap;
use std::path::Path;

use rocksdb::{DB, Options};

/// What the fixture writer's operations fail with.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The separator the family's database layer puts between the elements of
/// a key (tuwunel and continuwuity `src/database/ser.rs`).
pub const SEP: u8 = 0xFF;

/// tuwunel's MSC4225 one-time key column family.
pub const OTK_MSC4225: &str = "onetimekeyid4225_otk";
/// The older one-time key column family (conduit, conduwuit, continuwuity,
/// tuwunel before MSC4225).
pub const OTK_KEY_ID: &str = "onetimekeyid_onetimekeys";
/// tuwunel's fallback key column family.
pub const FALLBACK_TUWUNEL: &str = "userdeviceidalgorithm_fallback";
/// continuwuity's fallback key column family.
pub const FALLBACK_CONTINUWUITY: &str = "fallbackkeyid_fallbackkey";

/// `user 0xFF device 0xFF`: how every key of a device starts.
fn device_prefix(user_id: &str, device_id: &str) -> Vec<u8> {
    [user_id.as_bytes(), &[SEP], device_id.as_bytes(), &[SEP]].concat()
}

/// A fallback key's key in both servers' column families: `(user, device,
/// algorithm)`.
fn fallback_key(user_id: &str, device_id: &str, key_id: &str) -> Vec<u8> {
    let algorithm = key_id.split_once(':').map_or(key_id, |(a, _)| a);
    [
        device_prefix(user_id, device_id),
        algorithm.as_bytes().to_vec(),
    ]
    .concat()
}

/// A RocksDB database written the way the family's homeservers write their
/// key column families (plus a column family of theirs that holds no
/// keys, as a real database has many).
pub struct SourceDb {
    db: DB,
    names: Vec<String>,
}

impl std::fmt::Debug for SourceDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceDb")
            .field("path", &self.db.path())
            .finish()
    }
}

impl SourceDb {
    /// Creates a database at `path` with the column families `cfs` and
    /// tuwunel's `pduid_pdu` (left empty).
    ///
    /// # Errors
    /// RocksDB's.
    pub fn create(path: &Path, cfs: &[&str]) -> Result<Self, Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let mut names: Vec<String> = cfs.iter().map(|c| (*c).to_owned()).collect();
        names.push("pduid_pdu".to_owned());
        let db = DB::open_cf(&opts, path, &names)?;
        Ok(Self { db, names })
    }

    /// Writes one entry as is.
    ///
    /// # Errors
    /// RocksDB's, and a column family the database was not created with.
    pub fn put(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let h = self
            .db
            .cf_handle(cf)
            .ok_or_else(|| format!("no column family {cf}"))?;
        Ok(self.db.put_cf(&h, key, value)?)
    }

    /// A one-time key as tuwunel's `add_one_time_key` writes it since
    /// MSC4225 (`src/service/users/keys.rs`): key
    /// `(user, device, count, key_id)` = `user 0xFF device 0xFF
    /// count(u64, big-endian) 0xFF key_id`, value the key JSON.
    ///
    /// # Errors
    /// RocksDB's.
    pub fn msc4225_otk(
        &self,
        user_id: &str,
        device_id: &str,
        count: u64,
        key_id: &str,
        key_json: &str,
    ) -> Result<(), Error> {
        let key = [
            device_prefix(user_id, device_id),
            count.to_be_bytes().to_vec(),
            vec![SEP],
            key_id.as_bytes().to_vec(),
        ]
        .concat();
        self.put(OTK_MSC4225, &key, key_json.as_bytes())
    }

    /// A one-time key as the older `add_one_time_key` writes it
    /// (continuwuity `src/service/users/keys.rs`): key `user 0xFF device
    /// 0xFF` then `serde_json::to_string(key_id)` (quotes included), value
    /// the key JSON.
    ///
    /// # Errors
    /// RocksDB's.
    pub fn key_id_otk(
        &self,
        user_id: &str,
        device_id: &str,
        key_id: &str,
        key_json: &str,
    ) -> Result<(), Error> {
        let quoted = serde_json::Value::String(key_id.to_owned()).to_string();
        let key = [device_prefix(user_id, device_id), quoted.into_bytes()].concat();
        self.put(OTK_KEY_ID, &key, key_json.as_bytes())
    }

    /// A fallback key as tuwunel's `add_fallback_key` / `take_fallback_key`
    /// write it: key `user 0xFF device 0xFF algorithm`, value
    /// `Json(FallbackEntry { key_id, key, used })`.
    ///
    /// # Errors
    /// RocksDB's.
    pub fn tuwunel_fallback(
        &self,
        user_id: &str,
        device_id: &str,
        key_id: &str,
        key_json: &str,
        used: bool,
    ) -> Result<(), Error> {
        let key = fallback_key(user_id, device_id, key_id);
        // `{"key_id":..,"key":..,"used":..}`, the key JSON as uploaded.
        let value = format!(
            "{{\"key_id\":{},\"key\":{key_json},\"used\":{used}}}",
            serde_json::Value::String(key_id.to_owned())
        );
        self.put(FALLBACK_TUWUNEL, &key, value.as_bytes())
    }

    /// A fallback key as continuwuity's `add_fallback_key` writes it: key
    /// `user 0xFF device 0xFF algorithm`, value the tuple `(used, key_id,
    /// Json(key))` = `used(0 or 1) 0xFF key_id 0xFF key JSON`.
    ///
    /// # Errors
    /// RocksDB's.
    pub fn continuwuity_fallback(
        &self,
        user_id: &str,
        device_id: &str,
        key_id: &str,
        key_json: &str,
        used: bool,
    ) -> Result<(), Error> {
        let key = fallback_key(user_id, device_id, key_id);
        let value = [
            vec![u8::from(used), SEP],
            key_id.as_bytes().to_vec(),
            vec![SEP],
            key_json.as_bytes().to_vec(),
        ]
        .concat();
        self.put(FALLBACK_CONTINUWUITY, &key, &value)
    }

    /// Flushes every column family to SST files and closes the database.
    ///
    /// # Errors
    /// RocksDB's.
    pub fn finish(self) -> Result<(), Error> {
        for name in &self.names {
            if let Some(h) = self.db.cf_handle(name) {
                self.db.flush_cf(&h)?;
            }
        }
        Ok(())
    }
}

/// A database's entries: (column family, key) -> value.
pub type Entries = BTreeMap<(String, Vec<u8>), Vec<u8>>;

/// Every entry of every column family of the database at `path`, read
/// read-only: (column family, key) -> value.
///
/// # Errors
/// RocksDB's.
pub fn entries(path: &Path) -> Result<Entries, Error> {
    let opts = Options::default();
    let names = DB::list_cf(&opts, path)?;
    let db = DB::open_cf_for_read_only(&opts, path, &names, false)?;
    let mut out = BTreeMap::new();
    for name in &names {
        let Some(h) = db.cf_handle(name) else {
            continue;
        };
        for item in db.iterator_cf(&h, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            out.insert((name.clone(), k.to_vec()), v.to_vec());
        }
    }
    Ok(out)
}

/// Key JSON for a test key: a signed key object as clients upload it (the
/// key material is made up).
pub fn key_json(name: &str, fallback: bool) -> String {
    let extra = if fallback { ",\"fallback\":true" } else { "" };
    format!(
        "{{\"key\":\"key-{name}\"{extra},\"signatures\":{{\"@u:example.org\":{{\"ed25519:DEV\":\"sig-{name}\"}}}}}}"
    )
}

/// Which one-time key column family a sample database is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtkCf {
    /// tuwunel's `onetimekeyid4225_otk` (upload order).
    Msc4225,
    /// The older `onetimekeyid_onetimekeys` (key ID order).
    KeyId,
}

/// Which fallback key column family a sample database is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackCf {
    /// tuwunel's `userdeviceidalgorithm_fallback`.
    Tuwunel,
    /// continuwuity's `fallbackkeyid_fallbackkey`.
    Continuwuity,
}

/// One claim the import must make possible: the key ID, the key JSON, and
/// whether it is the fallback key.
pub type Claim = (String, String, bool);

/// One device of a sample database, as the import must leave it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpectedDevice {
    /// The user ID.
    pub user_id: String,
    /// The device ID.
    pub device_id: String,
    /// Per algorithm, what claims of one key at a time hand out, in order:
    /// the one-time keys, then the fallback key if there is one.
    pub claims: BTreeMap<String, Vec<Claim>>,
    /// One-time key counts per algorithm.
    pub counts: BTreeMap<String, u64>,
    /// The algorithms with an unused fallback key, sorted.
    pub unused_fallbacks: Vec<String>,
    /// Every fallback key's ID and used flag.
    pub fallback_used: BTreeMap<String, bool>,
}

/// What a sample database holds and what importing it must report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// The devices with valid IDs, in (user ID, device ID) byte order.
    pub devices: Vec<ExpectedDevice>,
    /// One-time keys imported.
    pub one_time_keys: u64,
    /// Fallback keys imported.
    pub fallback_keys: u64,
    /// Of those, used ones.
    pub used_fallback_keys: u64,
    /// Devices left out (invalid IDs).
    pub skipped_devices: u64,
    /// One-time keys left out (invalid key ID or JSON, duplicates, and
    /// those of the devices left out).
    pub skipped_one_time_keys: u64,
}

const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";
const CAROL: &str = "@carol:example.org";

/// The sample's one-time keys: user, device, upload count, key ID, and
/// whether the value is key JSON. Upload order and key ID order differ;
/// one user ID and one device ID are prefixes of others (RocksDB orders
/// them after the longer ones); some counts hold `0xFF` bytes.
const OTKS: &[(&str, &str, u64, &str, bool)] = &[
    (ALICE, "PHONE", 100, "signed_curve25519:ZZZ", true),
    (ALICE, "PHONE", 101, "signed_curve25519:AAA", true),
    (ALICE, "PHONE", 102, "signed_curve25519:MMM", true),
    (ALICE, "PHONE", 103, "curve25519:C1", true),
    (ALICE, "PHONE", 104, "curve25519:C0", true),
    (ALICE, "PHONE", 0x01FF, "signed_curve25519:BBB", true),
    (ALICE, "PHONE", 0xFF00_FFFF, "signed_curve25519:000", true),
    (ALICE, "PHONEX", 5, "signed_curve25519:K2", true),
    (ALICE, "PHONEX", 6, "signed_curve25519:K1", true),
    ("@a:hs", "D", 7, "signed_curve25519:A1", true),
    ("@a:hs.org", "D", 8, "signed_curve25519:B1", true),
    ("not-a-user", "X", 9, "signed_curve25519:S1", true),
    (CAROL, "CAROL", 10, "signed_curve25519:", true),
    (CAROL, "CAROL", 11, "signed_curve25519:NOTJSON", false),
    (CAROL, "CAROL", 12, "signed_curve25519:OK1", true),
    // tuwunel's upload deduplication is racy: the same key ID can be
    // stored twice under two counts. The older entry is kept.
    (CAROL, "CAROL", 13, "signed_curve25519:DUP", true),
    (CAROL, "CAROL", 14, "signed_curve25519:DUP", true),
];

/// The sample's fallback keys: user, device, key ID, used.
const FALLBACKS: &[(&str, &str, &str, bool)] = &[
    (ALICE, "PHONE", "signed_curve25519:FB1", false),
    (ALICE, "PHONEX", "signed_curve25519:FB2", true),
    (BOB, "BOB", "signed_curve25519:FB3", false),
    (BOB, "BOB", "curve25519:FB4", true),
];

fn name_of(key_id: &str) -> &str {
    key_id.split_once(':').map_or(key_id, |(_, n)| n)
}

fn algorithm_of(key_id: &str) -> &str {
    key_id.split_once(':').map_or(key_id, |(a, _)| a)
}

/// Writes the sample database at `path` in the given layout (and flushes
/// it), and returns what importing it must give.
///
/// # Errors
/// RocksDB's.
pub fn write_sample(path: &Path, otk: OtkCf, fallback: FallbackCf) -> Result<Sample, Error> {
    let cfs = [
        match otk {
            OtkCf::Msc4225 => OTK_MSC4225,
            OtkCf::KeyId => OTK_KEY_ID,
        },
        match fallback {
            FallbackCf::Tuwunel => FALLBACK_TUWUNEL,
            FallbackCf::Continuwuity => FALLBACK_CONTINUWUITY,
        },
    ];
    let db = SourceDb::create(path, &cfs)?;
    for (user, device, count, key_id, valid) in OTKS {
        let json = if *valid {
            key_json(name_of(key_id), false)
        } else {
            "[1,2]".to_owned()
        };
        match otk {
            OtkCf::Msc4225 => db.msc4225_otk(user, device, *count, key_id, &json)?,
            OtkCf::KeyId => db.key_id_otk(user, device, key_id, &json)?,
        }
    }
    for (user, device, key_id, used) in FALLBACKS {
        let json = key_json(name_of(key_id), true);
        match fallback {
            FallbackCf::Tuwunel => db.tuwunel_fallback(user, device, key_id, &json, *used)?,
            FallbackCf::Continuwuity => {
                db.continuwuity_fallback(user, device, key_id, &json, *used)?;
            }
        }
    }
    db.finish()?;
    Ok(expected(otk))
}

/// What importing the sample must give, worked out from the tables above
/// with keyclaim's own ID and key JSON rules.
fn expected(otk: OtkCf) -> Sample {
    let mut sample = Sample::default();
    let mut devices: BTreeMap<(String, String), ExpectedDevice> = BTreeMap::new();
    // Per device and algorithm: (order, key ID) of the valid keys.
    let mut keys: BTreeMap<(String, String, String), BTreeMap<String, u64>> = BTreeMap::new();
    let mut skipped_devices = std::collections::BTreeSet::new();
    for (user, device, count, key_id, valid) in OTKS {
        if keyclaim::Device::parse(user, device).is_err() {
            skipped_devices.insert((*user, *device));
            sample.skipped_one_time_keys += 1;
            continue;
        }
        let entry = devices
            .entry(((*user).to_owned(), (*device).to_owned()))
            .or_default();
        entry.user_id = (*user).to_owned();
        entry.device_id = (*device).to_owned();
        let per_alg = keys
            .entry((
                (*user).to_owned(),
                (*device).to_owned(),
                algorithm_of(key_id).to_owned(),
            ))
            .or_default();
        if !valid || keyclaim::KeyId::parse(*key_id).is_err() {
            sample.skipped_one_time_keys += 1;
        } else if per_alg.contains_key(*key_id) {
            // The older layout has one entry per key ID: nothing to skip.
            if otk == OtkCf::Msc4225 {
                sample.skipped_one_time_keys += 1;
            }
        } else {
            per_alg.insert((*key_id).to_owned(), *count);
        }
    }
    sample.skipped_devices = skipped_devices.len() as u64;
    for ((user, device, alg), ids) in keys {
        let mut ids: Vec<(u64, String)> = ids.into_iter().map(|(id, c)| (c, id)).collect();
        match otk {
            OtkCf::Msc4225 => ids.sort(),
            OtkCf::KeyId => ids.sort_by(|a, b| a.1.cmp(&b.1)),
        }
        if ids.is_empty() {
            continue;
        }
        let d = devices.entry((user, device)).or_default();
        d.counts.insert(alg.clone(), ids.len() as u64);
        sample.one_time_keys += ids.len() as u64;
        d.claims.insert(
            alg,
            ids.into_iter()
                .map(|(_, id)| {
                    let json = key_json(name_of(&id), false);
                    (id, json, false)
                })
                .collect(),
        );
    }
    for (user, device, key_id, used) in FALLBACKS {
        let d = devices
            .entry(((*user).to_owned(), (*device).to_owned()))
            .or_default();
        d.user_id = (*user).to_owned();
        d.device_id = (*device).to_owned();
        let alg = algorithm_of(key_id).to_owned();
        d.claims.entry(alg.clone()).or_default().push((
            (*key_id).to_owned(),
            key_json(name_of(key_id), true),
            true,
        ));
        if !used {
            d.unused_fallbacks.push(alg);
            d.unused_fallbacks.sort();
        }
        d.fallback_used.insert((*key_id).to_owned(), *used);
        sample.fallback_keys += 1;
        sample.used_fallback_keys += u64::from(*used);
    }
    sample.devices = devices.into_values().collect();
    sample
}
