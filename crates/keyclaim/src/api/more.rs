//! The facade's endpoints around the same keys: key reset (section 13),
//! dehydrated devices (section 14), reading fallback keys (R15.1) and many
//! devices' counts at once (R16.1).

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::body::{self, Kind, kind_of};
use super::{
    ApiError, Build, CheckOnly, FALLBACK_KEYS, KeysApi, Latest, UNSTABLE_FALLBACK_KEYS, UserKey,
    sync_fields, walk_users,
};
use crate::error::LimitKind;
use crate::ids::{Device, DeviceId, KeyId, UserId};
use crate::limits::too_large;
use crate::store::KeyStore;
use crate::types::{ResetScope, Upload, UploadOutcome};

impl<S: KeyStore> KeysApi<S> {
    /// Serves `POST /keys/reset` (MSC4162; unstable path
    /// `/_matrix/client/unstable/org.matrix.msc4162/keys/reset`) for an
    /// authenticated device (R13.2): body `{"all": bool, "key_ids":
    /// ["<algorithm>:<name>", ...]}`, `all: true` winning over `key_ids`; an
    /// empty or absent request resets nothing. Removes the stored one-time
    /// keys in scope (R13.1) and answers `{"device_one_time_keys_count":
    /// {...}}`.
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table: wrong types and bad
    /// key IDs `M_BAD_JSON`, more key IDs than one upload may carry
    /// `M_TOO_LARGE`; nothing is removed then.
    #[tracing::instrument(name = "keys_reset", skip(self, body), fields(body_len = body.len()))]
    pub async fn reset(
        &self,
        user_id: &str,
        device_id: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        let device = Device::new(UserId::parse(user_id)?, DeviceId::parse(device_id)?);
        let [all, key_ids] = self.parse_body(body, ["all", "key_ids"])?;
        let all = match (kind_of(all), all) {
            (None | Some(Kind::Null), _) => false,
            (Some(Kind::Bool), Some(all)) => body::boolean(all),
            _ => return Err(ApiError::bad_json("`all` must be a boolean")),
        };
        let mut ids = BTreeSet::new();
        match (kind_of(key_ids), key_ids) {
            (None | Some(Kind::Null), _) => {}
            (Some(Kind::Array), Some(list)) => {
                // Counted before any is kept, so that a list past the limit
                // is refused without being materialised (R8.2).
                self.limits().check_reset(body::count_elements(list)?)?;
                body::for_each_element(list, |id| {
                    if body::kind(id) != Kind::String {
                        return Err(ApiError::bad_json("`key_ids` must hold strings"));
                    }
                    ids.insert(KeyId::parse(body::text(id)?.into_owned())?);
                    Ok(())
                })?;
            }
            _ => return Err(ApiError::bad_json("`key_ids` must be an array")),
        }
        let scope = if all {
            ResetScope::All
        } else {
            ResetScope::KeyIds(ids)
        };
        let outcome = self.store.reset_one_time_keys(&device, &scope).await?;
        Ok(json!({ "device_one_time_keys_count": outcome.counts.to_wire() }))
    }

    /// Replaces a user's dehydrated device (MSC3814 `PUT /dehydrated_device`,
    /// R14.1): in one atomic step, removes the `previous` dehydrated device's
    /// keys (if any; it may equal `device_id`) and stores the keys of the
    /// body's `one_time_keys` and `fallback_keys` for `device_id`. Other
    /// fields of the body (`device_data`, `device_keys`, ...) are the
    /// homeserver's and ignored here. With
    /// [`KeysApi::with_dehydrated_fallback_required`], every algorithm with
    /// one-time keys needs a fallback key (R14.2). Answers `{"device_id":
    /// ..., "one_time_key_counts": {...}}`.
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table, as for
    /// [`KeysApi::upload`]; a missing fallback key under R14.2 is 400
    /// `M_INVALID_PARAM`. Nothing changes then.
    #[tracing::instrument(name = "keys_replace_dehydrated_device", skip(self, body), fields(body_len = body.len()))]
    pub async fn replace_dehydrated_device(
        &self,
        user_id: &str,
        previous: Option<&str>,
        device_id: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        let user = UserId::parse(user_id)?;
        let previous = previous.map(DeviceId::parse).transpose()?;
        let device = Device::new(user, DeviceId::parse(device_id)?);
        let [otks, stable, unstable] = self.parse_body(
            body,
            ["one_time_keys", FALLBACK_KEYS, UNSTABLE_FALLBACK_KEYS],
        )?;
        let upload = self.parse_upload(device, otks, stable, unstable)?;
        let outcome = self.replace_with(previous.as_ref(), &upload).await?;
        Ok(json!({
            "device_id": upload.device().device_id.as_str(),
            "one_time_key_counts": outcome.counts.to_wire(),
        }))
    }

    /// Replaces the upload's user's `previous` device with the upload
    /// (R14.1), after the R14.2 check when the facade requires it.
    pub(crate) async fn replace_with(
        &self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome, ApiError> {
        if self.dehydrated_fallback_required {
            upload.require_fallback_keys()?;
        }
        Ok(self.store.replace_device(previous, upload).await?)
    }

    /// A device's current fallback keys without marking them used (MSC4081,
    /// R15.1): `{"fallback_keys": {key_id: key_json}, "used": [algorithm,
    /// ...]}`, `used` listing the algorithms whose key was handed out, in
    /// byte order.
    ///
    /// # Errors
    /// 400 `M_INVALID_PARAM` for bad IDs, 500 `M_UNKNOWN` for storage failures.
    #[tracing::instrument(name = "keys_fallback_keys", skip(self))]
    pub async fn fallback_keys(&self, user_id: &str, device_id: &str) -> Result<Value, ApiError> {
        let device = Device::new(UserId::parse(user_id)?, DeviceId::parse(device_id)?);
        let keys = self.store.fallback_keys(&device).await?;
        let mut out = Map::new();
        let mut used = Vec::new();
        for (algorithm, key) in &keys {
            out.insert(key.key_id.as_str().to_owned(), key.key_json.to_value());
            if key.used {
                used.push(algorithm.as_str());
            }
        }
        // `out` moved in, not copied through `json!`.
        let mut answer = Map::new();
        answer.insert("fallback_keys".to_owned(), Value::Object(out));
        answer.insert("used".to_owned(), json!(used));
        Ok(Value::Object(answer))
    }

    /// Counts and unused fallback types of many devices at once (MSC3202,
    /// R16.1), for pushing to application services: body `{"devices":
    /// {user_id: [device_id, ...]}}`, answer `{user_id: {device_id:
    /// {"device_one_time_keys_count": {...},
    /// "device_unused_fallback_key_types": [...]}}}`. Devices without keys
    /// answer the empty form; a device named twice is answered once.
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table: wrong types
    /// `M_BAD_JSON`, bad IDs `M_INVALID_PARAM`, more than
    /// [`Limits::max_counts_devices`](crate::Limits) devices `M_TOO_LARGE`.
    #[tracing::instrument(name = "keys_counts_many", skip(self, body), fields(body_len = body.len(), devices))]
    pub async fn counts_many(&self, body: &[u8]) -> Result<Value, ApiError> {
        let [users] = self.parse_body(body, ["devices"])?;
        let limit = self.limits().max_counts_devices;
        let users = match (kind_of(users), users) {
            (None | Some(Kind::Null), _) => None,
            (Some(Kind::Object), Some(users)) => Some(users),
            _ => return Err(ApiError::bad_json("`devices` must be an object")),
        };
        let (mut named, latest) = match users {
            // Read twice, as claim bodies are: first only checked, so that
            // a body refused is refused before any device is built (R8.2).
            Some(users) => {
                walk_device_lists(users, limit, &mut CheckOnly::default())?;
                let mut build = BuildDevices::default();
                let latest = walk_device_lists(users, limit, &mut build)?;
                (build.named, latest)
            }
            None => (Vec::new(), Latest::default()),
        };
        named.retain(|(at, device)| latest.is_latest(&device.user_id, *at));
        named.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        named.dedup_by(|a, b| a.1 == b.1);
        let devices: Vec<Device> = named.into_iter().map(|(_, device)| device).collect();
        tracing::Span::current().record("devices", devices.len());
        let states = if devices.is_empty() {
            Vec::new()
        } else {
            self.store.counts_many(&devices).await?
        };
        let mut users = Map::new();
        for (device, state) in devices.iter().zip(states) {
            let entry = users
                .entry(device.user_id.as_str())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(by_device) = entry {
                by_device.insert(
                    device.device_id.as_str().to_owned(),
                    Value::Object(sync_fields(&state)),
                );
            }
        }
        Ok(Value::Object(users))
    }
}

/// A body's device lists per user, kept or only checked (see
/// [`super::UserKey`]).
pub(super) trait DeviceSink: UserKey {
    /// Device `name` of occurrence `at` of `user`.
    fn device(&mut self, user: &Self::User, at: usize, name: Cow<'_, str>) -> Result<(), ApiError>;
}

impl DeviceSink for CheckOnly {
    fn device(&mut self, _: &u64, _: usize, name: Cow<'_, str>) -> Result<(), ApiError> {
        Ok(DeviceId::check(&name)?)
    }
}

/// Builds the devices a body names.
pub(super) type BuildDevices = Build<(usize, Device)>;

impl DeviceSink for BuildDevices {
    fn device(&mut self, user: &UserId, at: usize, name: Cow<'_, str>) -> Result<(), ApiError> {
        let device = DeviceId::parse(name.into_owned())?;
        self.named.push((at, Device::new(user.clone(), device)));
        Ok(())
    }
}

/// Walks the users of a body of device lists (`{user_id: [device_id,
/// ...]}`, R16.1), giving `sink` each device. A user named twice counts
/// once, its last occurrence, with the length of its list; a list is
/// counted before any of it is read, so that lists past `limit` are refused
/// without being read (R8.2). Answers who named what last.
pub(super) fn walk_device_lists<S: DeviceSink>(
    users: &RawValue,
    limit: usize,
    sink: &mut S,
) -> Result<Latest<S::User, S::At>, ApiError> {
    walk_users(
        users,
        sink,
        Kind::Array,
        "`devices` values must be arrays",
        |sink, user, at, list, others| {
            let len = body::count_elements(list)?;
            if others + len > limit {
                return Err(too_large(LimitKind::CountsDevices, limit).into());
            }
            body::for_each_element(list, |id| {
                if body::kind(id) != Kind::String {
                    return Err(ApiError::bad_json("device IDs must be strings"));
                }
                sink.device(user, at, body::text(id)?)
            })?;
            Ok(len)
        },
    )
}
