//! [`KeysApi`]: the wire facade (contract section 9). Matrix request bodies in,
//! Matrix response JSON out.

pub(crate) mod body;
mod more;
mod provider;

pub use provider::{ClaimOptions, OtkProvider};

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use self::body::{Kind, kind_of};

use crate::error::{Error, LimitKind};
use crate::ids::{Algorithm, Device, DeviceId, KeyId, UserId};
use crate::key_json::KeyJson;
use crate::limits::{Limits, too_large};
use crate::store::KeyStore;
use crate::types::{ClaimTarget, ClaimedKey, SyncState, Upload, keys_to_wire};

/// The stable name of the fallback key upload field.
const FALLBACK_KEYS: &str = "fallback_keys";
/// The unstable (MSC2732) name of the fallback key upload field.
const UNSTABLE_FALLBACK_KEYS: &str = "org.matrix.msc2732.fallback_keys";
/// The sync field listing unused fallback key types (R6.3).
const UNUSED_TYPES: &str = "device_unused_fallback_key_types";
/// The unstable (MSC2732) name of the sync field.
const UNSTABLE_UNUSED_TYPES: &str = "org.matrix.msc2732.device_unused_fallback_key_types";

/// A Matrix error answer: HTTP status, `errcode` and a message that never
/// contains key material.
#[derive(Debug)]
pub struct ApiError {
    status: u16,
    errcode: &'static str,
    message: String,
    source: Option<Box<Error>>,
}

impl ApiError {
    fn new(status: u16, errcode: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
            source: None,
        }
    }

    fn bad_json(message: impl Into<String>) -> Self {
        Self::new(400, "M_BAD_JSON", message)
    }

    /// The HTTP status (400 or 500).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The Matrix `errcode`, e.g. `M_BAD_JSON`.
    pub fn errcode(&self) -> &str {
        self.errcode
    }

    /// The human-readable message (the `error` field).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The store error behind this answer, if any.
    pub fn store_error(&self) -> Option<&Error> {
        self.source.as_deref()
    }

    /// Whether the request may succeed if retried (a transient storage failure).
    pub fn is_retryable(&self) -> bool {
        self.source.as_deref().is_some_and(Error::is_retryable)
    }

    /// The response body: `{"errcode": ..., "error": ...}`.
    pub fn to_json(&self) -> Value {
        json!({ "errcode": self.errcode, "error": self.message })
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.errcode, self.message)
    }
}

impl std::error::Error for ApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let (status, errcode) = match &err {
            Error::InvalidUserId { .. }
            | Error::InvalidDeviceId { .. }
            | Error::Conflict { .. }
            | Error::DuplicateFallback { .. }
            | Error::MissingFallback { .. } => (400, "M_INVALID_PARAM"),
            Error::InvalidKeyId { .. }
            | Error::InvalidKeyJson { .. }
            | Error::BadRequest { .. } => (400, "M_BAD_JSON"),
            Error::TooLarge { .. } => (400, "M_TOO_LARGE"),
            _ => (500, "M_UNKNOWN"),
        };
        let message = if status == 500 {
            // Internal details stay in the source chain and the logs.
            "internal storage failure".to_owned()
        } else {
            err.to_string()
        };
        Self {
            status,
            errcode,
            message,
            source: Some(Box::new(err)),
        }
    }
}

/// The wire facade: serves `POST /keys/upload`, `POST /keys/claim`, the E2EE
/// fields of `/sync` and device deletion over any [`KeyStore`].
///
/// ```
/// # async fn demo() -> Result<(), keyclaim::ApiError> {
/// # #[derive(Debug)] struct S;
/// # fn store() -> std::sync::Arc<dyn keyclaim::KeyStore> { unimplemented!() }
/// let api = keyclaim::KeysApi::new(store());
/// let counts = api
///     .upload("@alice:example.org", "DEV", br#"{"one_time_keys": {"signed_curve25519:A": "k"}}"#)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct KeysApi<S> {
    store: S,
    limits: Option<Limits>,
    unstable_alias: bool,
    dehydrated_fallback_required: bool,
}

impl<S: KeyStore> KeysApi<S> {
    /// A facade over a store, with the store's limits and the unstable MSC2732
    /// sync alias on.
    pub fn new(store: S) -> Self {
        Self {
            store,
            limits: None,
            unstable_alias: true,
            dehydrated_fallback_required: false,
        }
    }

    /// Requires every upload for a dehydrated device
    /// ([`KeysApi::replace_dehydrated_device`]) to carry a fallback key for
    /// each algorithm it carries one-time keys of (R14.2); without one the
    /// request fails with 400 `M_INVALID_PARAM` and nothing changes. Off by
    /// default.
    #[must_use]
    pub fn with_dehydrated_fallback_required(mut self, on: bool) -> Self {
        self.dehydrated_fallback_required = on;
        self
    }

    /// Uses other limits for what the facade checks before the store sees a
    /// request (body size, keys per upload, claim targets). The store still
    /// enforces its own.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Switches the `org.matrix.msc2732.device_unused_fallback_key_types`
    /// alias in [`KeysApi::sync`] on (the default) or off.
    #[must_use]
    pub fn with_unstable_fallback_alias(mut self, on: bool) -> Self {
        self.unstable_alias = on;
        self
    }

    /// The store behind the facade.
    pub fn store(&self) -> &S {
        &self.store
    }

    pub(crate) fn limits(&self) -> &Limits {
        self.limits.as_ref().unwrap_or_else(|| self.store.limits())
    }

    /// Checks a request body's size and that it is JSON (R8.2, section 9),
    /// then hands back the members named `names` (each the last occurrence
    /// of its name), borrowed from the body. No JSON tree is built.
    fn parse_body<'a, const N: usize>(
        &self,
        body: &'a [u8],
        names: [&str; N],
    ) -> Result<[Option<&'a RawValue>; N], ApiError> {
        if body.len() > self.limits().max_body_bytes {
            return Err(too_large(LimitKind::RequestBytes, self.limits().max_body_bytes).into());
        }
        body::check_json(body)?;
        body::fields(body, names)
    }

    /// The keys of an upload body (`one_time_keys`, `fallback_keys` or its
    /// unstable alias), validated and checked against the request limits.
    /// The key maps are read member by member and refused as soon as they
    /// hold more keys than one upload may carry (R8.2); each key's JSON is
    /// canonicalized from its text ([`KeyJson`]).
    fn parse_upload(
        &self,
        device: Device,
        otks: Option<&RawValue>,
        stable: Option<&RawValue>,
        unstable: Option<&RawValue>,
    ) -> Result<Upload, ApiError> {
        let otks = key_map(otks, "one_time_keys")?;
        let fallbacks = match key_map(stable, FALLBACK_KEYS)? {
            Some(stable) => Some(stable),
            None => key_map(unstable, UNSTABLE_FALLBACK_KEYS)?,
        };
        let max_keys = self.limits().max_keys_per_upload;
        let otks = collect_keys(otks, 0, max_keys)?;
        let fallbacks = collect_keys(fallbacks, otks.len(), max_keys)?;
        let max_bytes = self.limits().max_key_json_bytes;
        let mut too_big = false;
        let mut upload = Upload::new(device);
        for (id, json) in self.parse_keys(otks)? {
            too_big |= json.is_none();
            upload.add_one_time_key(id, json.unwrap_or_else(KeyJson::placeholder))?;
        }
        for (id, json) in self.parse_keys(fallbacks)? {
            too_big |= json.is_none();
            upload.add_fallback_key(id, json.unwrap_or_else(KeyJson::placeholder))?;
        }
        if too_big {
            return Err(too_large(LimitKind::KeyJsonBytes, max_bytes).into());
        }
        self.limits().check_upload(&upload)?;
        Ok(upload)
    }

    /// Each key of a key map in key ID order: its ID and its JSON, `None`
    /// when the JSON is too large to canonicalize within the limit (R8.2).
    fn parse_keys(
        &self,
        keys: BTreeMap<String, &RawValue>,
    ) -> Result<Vec<(KeyId, Option<KeyJson>)>, ApiError> {
        let max_bytes = self.limits().max_key_json_bytes;
        keys.into_iter()
            .map(|(id, json)| {
                let id = KeyId::parse(id)?;
                let json = KeyJson::from_body_text(json.get(), max_bytes)
                    .map_err(|e| e.with_key_id(&id))?;
                Ok((id, json))
            })
            .collect()
    }

    /// Serves `POST /keys/upload` for an authenticated device.
    ///
    /// Reads `one_time_keys` and `fallback_keys` (or the unstable
    /// `org.matrix.msc2732.fallback_keys` when the stable field is absent or
    /// null); ignores `device_keys` when it is an object or null, and unknown
    /// fields. Answers `{"one_time_key_counts": {...}}` (R3.8, R6.1).
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table; nothing is stored then.
    #[tracing::instrument(name = "keys_upload", skip(self, body), fields(body_len = body.len()))]
    pub async fn upload(
        &self,
        user_id: &str,
        device_id: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        let device = Device::new(UserId::parse(user_id)?, DeviceId::parse(device_id)?);
        let [device_keys, otks, stable, unstable] = self.parse_body(
            body,
            [
                "device_keys",
                "one_time_keys",
                FALLBACK_KEYS,
                UNSTABLE_FALLBACK_KEYS,
            ],
        )?;
        match kind_of(device_keys) {
            None | Some(Kind::Null | Kind::Object) => {}
            Some(_) => return Err(ApiError::bad_json("`device_keys` must be an object")),
        }
        let upload = self.parse_upload(device, otks, stable, unstable)?;
        let outcome = self.store.upload(&upload).await?;
        Ok(json!({ "one_time_key_counts": outcome.counts.to_wire() }))
    }

    /// Serves `POST /keys/claim`.
    ///
    /// Reads `one_time_keys` (user -> device -> algorithm); ignores `timeout`
    /// and other fields. An algorithm string that is no valid algorithm
    /// matches nothing (R4.6). Answers
    /// `{"one_time_keys": {user: {device: {key_id: key_json}}}, "failures": {}}`.
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table; nothing is consumed then.
    #[tracing::instrument(name = "keys_claim", skip(self, body), fields(body_len = body.len(), targets))]
    pub async fn claim(&self, body: &[u8]) -> Result<Value, ApiError> {
        let targets = self.claim_targets(body)?;
        tracing::Span::current().record("targets", targets.len());
        let outcome = if targets.is_empty() {
            Default::default()
        } else {
            self.store.claim(&targets).await?
        };
        Ok(claim_answer(&outcome.keys))
    }

    /// The targets of a `POST /keys/claim` body (section 9), in (user,
    /// device) order. A user or device named twice counts once, its last
    /// occurrence; the targets are refused as soon as there are more than a
    /// claim may have (R8.2). What is kept while reading is bounded by that
    /// limit: the targets, and the users that have some.
    fn claim_targets(&self, body: &[u8]) -> Result<Vec<ClaimTarget>, ApiError> {
        let [users] = self.parse_body(body, ["one_time_keys"])?;
        let limit = self.limits().max_claim_targets;
        let users = match (kind_of(users), users) {
            (None | Some(Kind::Null), _) => return Ok(Vec::new()),
            (Some(Kind::Object), Some(users)) => users,
            _ => return Err(ApiError::bad_json("`one_time_keys` must be an object")),
        };
        // The body is read twice: first only checked, keeping a hash and a
        // count per user, so that a body refused (a bad ID, a wrong type or
        // too many targets, R8.2) is refused before any target is built;
        // then read again to build the targets.
        walk_claim_body(users, limit, &mut CheckOnly::default())?;
        let mut build = BuildClaims::default();
        let latest = walk_claim_body(users, limit, &mut build)?;
        let mut named = build.named;
        named.retain(|(at, device, _)| latest.is_latest(&device.user_id, *at));
        named.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        Ok(named
            .into_iter()
            .filter_map(|(_, device, algorithm)| {
                algorithm.map(|algorithm| ClaimTarget::one(device, algorithm))
            })
            .collect())
    }

    /// The E2EE fields of a `/sync` response for a device (section 6):
    /// `device_one_time_keys_count`, `device_unused_fallback_key_types` and,
    /// unless switched off, its unstable alias.
    ///
    /// # Errors
    /// 400 `M_INVALID_PARAM` for bad IDs, 500 `M_UNKNOWN` for storage failures.
    #[tracing::instrument(name = "keys_sync", skip(self))]
    pub async fn sync(&self, user_id: &str, device_id: &str) -> Result<Value, ApiError> {
        let device = Device::new(UserId::parse(user_id)?, DeviceId::parse(device_id)?);
        let state = self.store.sync_state(&device).await?;
        let mut out = sync_fields(&state);
        if self.unstable_alias {
            let types = out[UNUSED_TYPES].clone();
            out.insert(UNSTABLE_UNUSED_TYPES.to_owned(), types);
        }
        Ok(Value::Object(out))
    }

    /// Deletes a device's keys (R7.1), e.g. when the device is logged out.
    ///
    /// # Errors
    /// 400 `M_INVALID_PARAM` for bad IDs, 500 `M_UNKNOWN` for storage failures.
    #[tracing::instrument(name = "keys_delete_device", skip(self))]
    pub async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<(), ApiError> {
        let device = Device::new(UserId::parse(user_id)?, DeviceId::parse(device_id)?);
        self.store.delete_device(&device).await?;
        Ok(())
    }

    /// Deletes the keys of all of a user's devices (R7.2), e.g. on account
    /// deactivation.
    ///
    /// # Errors
    /// 400 `M_INVALID_PARAM` for a bad user ID, 500 `M_UNKNOWN` for storage failures.
    #[tracing::instrument(name = "keys_delete_user", skip(self))]
    pub async fn delete_user(&self, user_id: &str) -> Result<(), ApiError> {
        self.store.delete_user(&UserId::parse(user_id)?).await?;
        Ok(())
    }
}

/// The answer to a claim: `{"one_time_keys": {user: {device: {key_id:
/// key_json}}}, "failures": {}}`. A later key under the same key ID of one
/// device replaces an earlier one.
fn claim_answer<'a>(keys: impl IntoIterator<Item = &'a ClaimedKey>) -> Value {
    // Built by moving the key tree in: `json!` would serialize it into a
    // copy of itself first.
    let mut out = Map::new();
    out.insert("one_time_keys".to_owned(), keys_to_wire(keys));
    out.insert("failures".to_owned(), Value::Object(Map::new()));
    Value::Object(out)
}

/// One device's counts and unused fallback types in the wire form (R6.1,
/// R6.3), as `/sync` and the bulk read answer them.
fn sync_fields(state: &SyncState) -> Map<String, Value> {
    let types: Vec<&str> = state
        .unused_fallback_key_types
        .iter()
        .map(Algorithm::as_str)
        .collect();
    let mut out = Map::new();
    out.insert(
        "device_one_time_keys_count".to_owned(),
        state.one_time_key_counts.to_wire(),
    );
    out.insert(UNUSED_TYPES.to_owned(), json!(types));
    out
}

/// For a map from users to what they name, read member by member: the
/// latest occurrence of each user's name that named something, and how many
/// things it named. Users that named nothing are not kept (a later empty
/// occurrence removes an earlier one), so what this holds is bounded by the
/// request's limit, not by the body.
struct Latest<K = UserId, A = usize> {
    users: std::collections::HashMap<K, (A, usize)>,
    total: usize,
}

impl<K, A> Default for Latest<K, A> {
    fn default() -> Self {
        Self {
            users: std::collections::HashMap::new(),
            total: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, A: Copy + PartialEq> Latest<K, A> {
    /// How many things the latest occurrence of `user` named.
    fn count(&self, user: &K) -> usize {
        self.users.get(user).map_or(0, |(_, n)| *n)
    }

    /// Records occurrence `at` of `user`, naming `n` things; it replaces
    /// every earlier one.
    fn set(&mut self, user: &K, at: A, n: usize) {
        self.total -= self.count(user);
        if n == 0 {
            self.users.remove(user);
        } else {
            self.users.insert(user.clone(), (at, n));
            self.total += n;
        }
    }

    /// Whether occurrence `at` is the latest of `user` (and named something).
    fn is_latest(&self, user: &K, at: A) -> bool {
        self.users
            .get(user)
            .is_some_and(|(latest, _)| *latest == at)
    }
}

/// What a walk over a body naming users' devices keeps of them: the
/// targets ([`BuildClaims`], `BuildDevices`) or nothing but a hash and a
/// count per user ([`CheckOnly`]). Both meet the same checks, so the
/// checking walk refuses only bodies the building one refuses (with the same
/// error when a body has one fault), and every one of them but where two
/// hashes collide.
trait UserKey {
    /// How a user is told apart from the others.
    type User: std::hash::Hash + Eq + Clone;

    /// What is kept of an occurrence of a user's name (its place in the
    /// body, or nothing when only the counts matter).
    type At: Copy + PartialEq;

    /// What is kept of occurrence `occurrence`.
    fn at(occurrence: usize) -> Self::At;

    /// The user named `name`, checked (R2.1).
    fn user(&self, name: Cow<'_, str>) -> Result<Self::User, ApiError>;
}

/// A walk that checks and keeps nothing: users told apart by a hash of
/// their IDs (a collision could only leave the refusal of a body to the
/// building walk).
#[derive(Default)]
struct CheckOnly(std::hash::RandomState);

impl UserKey for CheckOnly {
    type User = u64;
    type At = ();

    fn at(_: usize) {}

    fn user(&self, name: Cow<'_, str>) -> Result<u64, ApiError> {
        UserId::check(&name)?;
        Ok(std::hash::BuildHasher::hash_one(&self.0, name.as_ref()))
    }
}

/// A claim body's targets per user, kept or only checked.
trait ClaimSink: UserKey {
    /// Reads the devices (user -> algorithm string) that occurrence `at`
    /// of `user` names, a device named twice counting once with its last
    /// occurrence; refused with `M_TOO_LARGE` once there are more than
    /// `room` of them (of `limit` targets in all, R8.2). Answers how many
    /// there are.
    fn devices(
        &mut self,
        user: &Self::User,
        at: usize,
        devices: &RawValue,
        room: usize,
        limit: usize,
    ) -> Result<usize, ApiError>;
}

impl ClaimSink for CheckOnly {
    /// Reads the devices in body order instead of in name order, keeping
    /// per device name a 32-bit hash and whether its latest value so far is
    /// at fault (not a string, or a string that does not decode). So a
    /// fault found may not be the one the building walk meets first
    /// (section 9 lets any be answered), but a body is refused here only
    /// when it is refused there (a collision of two names' hashes could
    /// only leave a refusal to the building walk), and with the same error
    /// when it has one fault.
    fn devices(
        &mut self,
        _: &u64,
        _: usize,
        devices: &RawValue,
        room: usize,
        limit: usize,
    ) -> Result<usize, ApiError> {
        /// An algorithm value that is not a string (`M_BAD_JSON`).
        const NOT_A_STRING: u8 = 1;
        /// A string that does not decode (`M_NOT_JSON`).
        const UNDECODABLE: u8 = 2;
        let mut names: std::collections::HashMap<u32, u8> = std::collections::HashMap::new();
        body::for_each_member(devices, |device, algorithm| {
            // The low half of a 64-bit hash.
            let name = std::hash::BuildHasher::hash_one(&self.0, device.as_ref()) as u32;
            let fault = if body::kind(algorithm) != Kind::String {
                NOT_A_STRING
            } else if body::text(algorithm).is_err() {
                UNDECODABLE
            } else {
                0
            };
            names.insert(name, fault);
            if names.len() > room {
                return Err(too_large(LimitKind::ClaimTargets, limit).into());
            }
            DeviceId::check(&device)?;
            Ok(())
        })?;
        match names.values().copied().max() {
            Some(UNDECODABLE) => Err(body::not_json()),
            Some(NOT_A_STRING) => Err(ApiError::bad_json(ALGORITHMS_MUST_BE_STRINGS)),
            _ => Ok(names.len()),
        }
    }
}

/// A walk that builds what the body names, each with the occurrence of its
/// user's name that named it.
struct Build<T> {
    named: Vec<T>,
}

impl<T> Default for Build<T> {
    fn default() -> Self {
        Self { named: Vec::new() }
    }
}

impl<T> UserKey for Build<T> {
    type User = UserId;
    type At = usize;

    fn at(occurrence: usize) -> usize {
        occurrence
    }

    fn user(&self, name: Cow<'_, str>) -> Result<UserId, ApiError> {
        Ok(UserId::parse(name.into_owned())?)
    }
}

/// Builds a claim body's targets: every device named, with its algorithm
/// (`None` for an algorithm string that matches nothing, R4.6, which still
/// counts).
type BuildClaims = Build<(usize, Device, Option<Algorithm>)>;

impl ClaimSink for BuildClaims {
    /// Reads the devices by name (the last occurrence of a name counting),
    /// then checks them in name order (as section 9 reads a JSON object).
    fn devices(
        &mut self,
        user: &UserId,
        at: usize,
        devices: &RawValue,
        room: usize,
        limit: usize,
    ) -> Result<usize, ApiError> {
        let mut members: BTreeMap<Cow<'_, str>, &RawValue> = BTreeMap::new();
        body::for_each_member(devices, |device, algorithm| {
            members.insert(device, algorithm);
            if members.len() > room {
                return Err(too_large(LimitKind::ClaimTargets, limit).into());
            }
            Ok(())
        })?;
        let n = members.len();
        let mut wanted = Vec::with_capacity(n);
        for (device, algorithm) in members {
            let device_id = DeviceId::parse(device.into_owned())?;
            let algorithm = Algorithm::parse(algorithm_text(algorithm)?.into_owned()).ok();
            wanted.push((device_id, algorithm));
        }
        for (device_id, algorithm) in wanted {
            self.named
                .push((at, Device::new(user.clone(), device_id), algorithm));
        }
        Ok(n)
    }
}

/// The error of a claim target's algorithm that is not a string.
const ALGORITHMS_MUST_BE_STRINGS: &str = "algorithms must be strings";

/// A claim target's algorithm string (section 9: a string, else
/// `M_BAD_JSON`).
fn algorithm_text(algorithm: &RawValue) -> Result<Cow<'_, str>, ApiError> {
    if body::kind(algorithm) != Kind::String {
        return Err(ApiError::bad_json(ALGORITHMS_MUST_BE_STRINGS));
    }
    body::text(algorithm)
}

/// Walks a map from users to what each names (`users`, a JSON object):
/// each user's name is checked by `sink`, its value must be of kind `kind`
/// (else `M_BAD_JSON` with `not_kind`), and `names` reads the value of
/// occurrence `at` of the user, given how many things the other users'
/// latest occurrences named, and answers how many things it names. A user
/// named twice counts once, its last occurrence. Answers who named what
/// last.
fn walk_users<S: UserKey>(
    users: &RawValue,
    sink: &mut S,
    kind: Kind,
    not_kind: &'static str,
    mut names: impl FnMut(&mut S, &S::User, usize, &RawValue, usize) -> Result<usize, ApiError>,
) -> Result<Latest<S::User, S::At>, ApiError> {
    let mut latest = Latest::default();
    let mut occurrence = 0usize;
    body::for_each_member(users, |user, value| {
        occurrence += 1;
        let user = sink.user(user)?;
        if body::kind(value) != kind {
            return Err(ApiError::bad_json(not_kind));
        }
        let others = latest.total - latest.count(&user);
        let n = names(sink, &user, occurrence, value, others)?;
        latest.set(&user, S::at(occurrence), n);
        Ok(())
    })?;
    Ok(latest)
}

/// Walks the users of a `POST /keys/claim` body (section 9), giving `sink`
/// each user's devices. A user or device named twice counts once, its last
/// occurrence; the targets are refused as soon as there are more than
/// `limit` (R8.2). What is kept while reading, besides what the sink keeps,
/// is bounded by that limit: the users that have some targets, and one
/// user's devices at a time. Answers who named what last.
fn walk_claim_body<S: ClaimSink>(
    users: &RawValue,
    limit: usize,
    sink: &mut S,
) -> Result<Latest<S::User, S::At>, ApiError> {
    walk_users(
        users,
        sink,
        Kind::Object,
        "`one_time_keys` values must be objects",
        |sink, user, at, devices, others| {
            sink.devices(user, at, devices, limit.saturating_sub(others), limit)
        },
    )
}

/// A key map field: absent or null is `None`, an object is `Some`, anything
/// else is `M_BAD_JSON`.
fn key_map<'a>(raw: Option<&'a RawValue>, field: &str) -> Result<Option<&'a RawValue>, ApiError> {
    match kind_of(raw) {
        None | Some(Kind::Null) => Ok(None),
        Some(Kind::Object) => Ok(raw),
        Some(_) => Err(ApiError::bad_json(format!("`{field}` must be an object"))),
    }
}

/// The members of a key map by name (the last occurrence of a name counts),
/// refused with `M_TOO_LARGE` as soon as they and the `before` keys of the
/// same upload are more than `max` (R8.2).
fn collect_keys(
    keys: Option<&RawValue>,
    before: usize,
    max: usize,
) -> Result<BTreeMap<String, &RawValue>, ApiError> {
    let mut out = BTreeMap::new();
    if let Some(keys) = keys {
        body::for_each_member(keys, |id, json| {
            out.insert(id.into_owned(), json);
            if before + out.len() > max {
                return Err(too_large(LimitKind::KeysPerUpload, max).into());
            }
            Ok(())
        })?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::{ApiError, BuildClaims, CheckOnly, walk_claim_body};
    use crate::api::more::{BuildDevices, walk_device_lists};

    fn outcome<T>(r: Result<T, ApiError>) -> Option<(u16, String, String)> {
        r.err()
            .map(|e| (e.status(), e.errcode().to_owned(), e.message().to_owned()))
    }

    /// Asserts that `check` and `build` answer each body alike; answers
    /// how many they refused.
    fn refused_alike(
        bodies: &[&str],
        check: impl Fn(&RawValue) -> Option<(u16, String, String)>,
        build: impl Fn(&RawValue) -> Option<(u16, String, String)>,
    ) -> usize {
        let mut refused = 0;
        for body in bodies {
            let users = raw(body);
            let built = build(&users);
            assert_eq!(check(&users), built, "{body}");
            refused += usize::from(built.is_some());
        }
        refused
    }

    fn raw(json: &str) -> Box<RawValue> {
        match RawValue::from_string(json.to_owned()) {
            Ok(raw) => raw,
            Err(e) => panic!("{json}: {e}"),
        }
    }

    /// The checking walk over a claim body refuses exactly what the
    /// building walk refuses, and with the same error when a body has one
    /// fault, whether an ID, a type or the number of targets (R8.2); a
    /// user or device named twice counts once, its last occurrence.
    #[test]
    fn checking_a_claim_body_refuses_what_building_it_refuses() {
        let bodies = [
            r#"{"@a:x":{"D":"alg"},"@b:x":{"E":"alg"}}"#,
            r#"{"@a:x":{"D":"alg"},"@b:x":{"E":"alg"},"@c:x":{"F":"alg"}}"#,
            r#"{"@a:x":{"D":"alg"},"@a:x":{"D":"alg","E":"x"},"@b:x":{}}"#,
            r#"{"@a:x":{"D":"alg","D":"other","E":"x"}}"#,
            r#"{"@a:x":{"D":"alg"},"@a:x":{},"@b:x":{"E":"a","F":"b"}}"#,
            r#"{"@a:x":{"D":"alg"},"bad":{"E":"alg"}}"#,
            r#"{"@a:x":{"D":"alg"},"@b:x":{"":"alg"}}"#,
            r#"{"@a:x":{"D":"alg"},"@b:x":{"E":7}}"#,
            r#"{"@a:x":{"D":"alg"},"@b:x":[]}"#,
            r#"{"@a:x":{"D":"alg","E":"a","F":"b"},"bad":{}}"#,
            r#"{"@a:x":{"D":"a:b"},"@b:x":{"E":"\u0000"}}"#,
            r#"{"@a:x":{"D\u0000":"alg"}}"#,
            r#"{"@a:x":{"D":7,"E":"a","D":"alg"}}"#,
            r#"{"@a:x":{"D":"alg","E":"a","D":7}}"#,
        ];
        let refused = refused_alike(
            &bodies,
            |users| outcome(walk_claim_body(users, 2, &mut CheckOnly::default())),
            |users| outcome(walk_claim_body(users, 2, &mut BuildClaims::default())),
        );
        assert_eq!(refused, 8, "the bodies refused are those meant to be");
    }

    /// The same for a body of device lists (R16.1).
    #[test]
    fn checking_device_lists_refuses_what_building_them_refuses() {
        let bodies = [
            r#"{"@a:x":["D"],"@b:x":["E"]}"#,
            r#"{"@a:x":["D"],"@b:x":["E"],"@c:x":["F"]}"#,
            r#"{"@a:x":["D","E","F"]}"#,
            r#"{"@a:x":["D"],"@a:x":["D","E"],"@b:x":[]}"#,
            r#"{"@a:x":["D"],"bad":["E"]}"#,
            r#"{"@a:x":["D"],"@b:x":[""]}"#,
            r#"{"@a:x":["D"],"@b:x":[7]}"#,
            r#"{"@a:x":["D"],"@b:x":{}}"#,
            r#"{"@a:x":["D","E","F"],"bad":[]}"#,
        ];
        let refused = refused_alike(
            &bodies,
            |users| outcome(walk_device_lists(users, 2, &mut CheckOnly::default())),
            |users| outcome(walk_device_lists(users, 2, &mut BuildDevices::default())),
        );
        assert_eq!(refused, 7, "the bodies refused are those meant to be");
    }
}
