// Over 500 lines: one scenario harness around two OlmMachines; its parts
// (the HTTP-free transport, the machines, the checks) only make sense together.
//! End-to-end checks of keyclaim against a real client state machine:
//! matrix-sdk-crypto's `OlmMachine`.
//!
//! A [`Homeserver`] serves the machines' own outgoing requests: `/keys/upload`
//! and `/keys/claim` through keyclaim (over the JSON facade with the exact
//! bytes ruma puts on the wire, or over the ruma facade: [`Transport`]), the
//! E2EE fields of `/sync` from keyclaim, `/keys/query` from a small test
//! double fed by the device keys in the uploads, and to-device messages from
//! an in-memory inbox. A [`Client`] is one device: an `OlmMachine` plus the
//! loop a real client runs around it (send outgoing requests, sync).
//!
//! This is test support code in a `publish = false` crate: a failure of the
//! machine or of keyclaim is a test failure, so it panics with a message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use keyclaim::{KeyStore, KeysApi};
use matrix_sdk_common::deserialized_responses::ProcessedToDeviceEvent;
use matrix_sdk_crypto::store::types::RoomKeyInfo;
use matrix_sdk_crypto::types::requests::{AnyOutgoingRequest, KeysQueryRequest, ToDeviceRequest};
use matrix_sdk_crypto::{
    DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine, TrustRequirement,
};
use ruma::api::auth_scheme::{AccessToken, SendAccessToken};
use ruma::api::client::keys::{claim_keys, get_keys, upload_keys};
use ruma::api::client::sync::sync_events;
use ruma::api::client::to_device::send_event_to_device;
use ruma::api::path_builder::VersionHistory;
use ruma::api::{IncomingResponse, MatrixVersion, OutgoingRequest, SupportedVersions};
use ruma::exports::http;
use ruma::serde::Raw;
use ruma::to_device::DeviceIdOrAllDevices;
use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};

/// The store behind the homeserver.
pub type Store = Arc<dyn KeyStore>;

const BASE_URL: &str = "https://hs.example.org";

/// How the homeserver hands the machines' requests to keyclaim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// ruma serializes each request to the HTTP body a client sends; the body
    /// goes through [`KeysApi::upload`] / [`KeysApi::claim`], and the JSON
    /// answer is parsed back by ruma as a client would.
    Json,
    /// The parsed ruma requests go through [`KeysApi::upload_ruma`] /
    /// [`KeysApi::claim_ruma`] (the `ruma` feature).
    Ruma,
}

/// One `/keys/upload` the homeserver served, as seen on the wire.
#[derive(Clone, Debug)]
pub struct UploadRecord {
    /// The uploading user.
    pub user_id: OwnedUserId,
    /// The uploading device.
    pub device_id: OwnedDeviceId,
    /// Whether it carried `device_keys`.
    pub device_keys: bool,
    /// The key IDs of its one-time keys.
    pub one_time_keys: Vec<String>,
    /// Its fallback keys, key ID to key JSON.
    pub fallback_keys: BTreeMap<String, Value>,
}

/// One `/keys/claim` the homeserver served.
#[derive(Clone, Debug)]
pub struct ClaimRecord {
    /// The claiming device.
    pub claimer: OwnedDeviceId,
    /// The keys handed out: (user, device, key ID, key JSON).
    pub keys: Vec<(String, String, String, Value)>,
}

#[derive(Debug, Default)]
struct State {
    /// The `/keys/query` double: device keys from the uploads.
    device_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Raw<ruma::encryption::DeviceKeys>>>,
    /// To-device messages waiting for the next sync of each device.
    inbox: BTreeMap<(OwnedUserId, OwnedDeviceId), Vec<Value>>,
    uploads: Vec<UploadRecord>,
    claims: Vec<ClaimRecord>,
    next_batch: u64,
    tamper: Option<fn(&mut Value)>,
}

/// A homeserver reduced to what end-to-end encryption setup needs, with
/// keyclaim serving the key endpoints.
#[derive(Debug)]
pub struct Homeserver {
    keys: KeysApi<Store>,
    transport: Transport,
    state: Mutex<State>,
}

fn wire_versions() -> Cow<'static, SupportedVersions> {
    Cow::Owned(SupportedVersions {
        versions: [MatrixVersion::V1_1].into_iter().collect(),
        features: BTreeSet::new(),
    })
}

/// Turns a keyclaim JSON answer into the HTTP response a client would parse.
fn http_ok(body: &Value) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body.to_string().into_bytes())
        .expect("a valid HTTP response")
}

/// The HTTP request ruma makes of an outgoing request.
fn http_request<R>(request: R, path: &str) -> http::Request<Vec<u8>>
where
    R: OutgoingRequest<Authentication = AccessToken, PathBuilder = VersionHistory>,
{
    let http = request
        .try_into_http_request::<Vec<u8>>(
            BASE_URL,
            SendAccessToken::IfRequired("token"),
            wire_versions(),
        )
        .expect("ruma serializes the request");
    assert_eq!(http.method(), http::Method::POST);
    assert_eq!(http.uri().path(), path);
    http
}

impl Homeserver {
    /// A homeserver over a store.
    pub fn new(store: Store, transport: Transport) -> Arc<Self> {
        Arc::new(Self {
            keys: KeysApi::new(store),
            transport,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keyclaim facade, e.g. to claim keys as some other party.
    pub fn keys(&self) -> &KeysApi<Store> {
        &self.keys
    }

    /// Every upload served so far.
    pub fn uploads(&self) -> Vec<UploadRecord> {
        self.state().uploads.clone()
    }

    /// Every claim served so far.
    pub fn claims(&self) -> Vec<ClaimRecord> {
        self.state().claims.clone()
    }

    /// From now on, alters every key JSON in `/keys/claim` answers with `f`
    /// on its way to the client (JSON transport only): a stand-in for a
    /// server that does not return key JSON exactly as uploaded (R2.5).
    pub fn tamper_claims(&self, f: fn(&mut Value)) {
        self.state().tamper = Some(f);
    }

    /// `POST /keys/upload`.
    ///
    /// # Panics
    /// When keyclaim refuses the machine's upload.
    pub async fn keys_upload(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        request: &upload_keys::v3::Request,
    ) -> upload_keys::v3::Response {
        {
            let mut state = self.state();
            if let Some(keys) = &request.device_keys {
                state
                    .device_keys
                    .entry(user_id.to_owned())
                    .or_default()
                    .insert(device_id.to_owned(), keys.clone());
            }
            state.uploads.push(UploadRecord {
                user_id: user_id.to_owned(),
                device_id: device_id.to_owned(),
                device_keys: request.device_keys.is_some(),
                one_time_keys: request
                    .one_time_keys
                    .keys()
                    .map(|k| k.to_string())
                    .collect(),
                fallback_keys: request
                    .fallback_keys
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            serde_json::from_str(v.json().get()).unwrap_or(Value::Null),
                        )
                    })
                    .collect(),
            });
        }
        match self.transport {
            Transport::Json => {
                let http = http_request(request.clone(), "/_matrix/client/v3/keys/upload");
                let answer = self
                    .keys
                    .upload(user_id.as_str(), device_id.as_str(), http.body())
                    .await
                    .unwrap_or_else(|e| panic!("keyclaim refused the machine's upload: {e}"));
                upload_keys::v3::Response::try_from_http_response(http_ok(&answer))
                    .expect("ruma parses keyclaim's upload answer")
            }
            Transport::Ruma => self
                .keys
                .upload_ruma(user_id, device_id, request)
                .await
                .unwrap_or_else(|e| panic!("keyclaim refused the machine's upload: {e}")),
        }
    }

    /// `POST /keys/claim`.
    ///
    /// # Panics
    /// When keyclaim refuses the machine's claim.
    pub async fn keys_claim(
        &self,
        claimer: &DeviceId,
        request: &claim_keys::v3::Request,
    ) -> claim_keys::v3::Response {
        let response = match self.transport {
            Transport::Json => {
                let http = http_request(request.clone(), "/_matrix/client/v3/keys/claim");
                let mut answer = self
                    .keys
                    .claim(http.body())
                    .await
                    .unwrap_or_else(|e| panic!("keyclaim refused the machine's claim: {e}"));
                if let Some(tamper) = self.state().tamper {
                    answer["one_time_keys"]
                        .as_object_mut()
                        .into_iter()
                        .flat_map(|users| users.values_mut())
                        .filter_map(Value::as_object_mut)
                        .flat_map(|devices| devices.values_mut())
                        .filter_map(Value::as_object_mut)
                        .flat_map(|keys| keys.values_mut())
                        .for_each(tamper);
                }
                claim_keys::v3::Response::try_from_http_response(http_ok(&answer))
                    .expect("ruma parses keyclaim's claim answer")
            }
            Transport::Ruma => self
                .keys
                .claim_ruma(request)
                .await
                .unwrap_or_else(|e| panic!("keyclaim refused the machine's claim: {e}")),
        };
        let mut keys = Vec::new();
        for (user, devices) in &response.one_time_keys {
            for (device, device_keys) in devices {
                for (id, raw) in device_keys {
                    let json = serde_json::from_str(raw.json().get()).unwrap_or(Value::Null);
                    keys.push((user.to_string(), device.to_string(), id.to_string(), json));
                }
            }
        }
        self.state().claims.push(ClaimRecord {
            claimer: claimer.to_owned(),
            keys,
        });
        response
    }

    /// `POST /keys/query`: the test double. Answers the device keys the
    /// devices uploaded; no cross-signing keys.
    pub fn keys_query(&self, request: &KeysQueryRequest) -> get_keys::v3::Response {
        let state = self.state();
        let mut response = get_keys::v3::Response::new();
        for (user, wanted) in &request.device_keys {
            let devices = state.device_keys.get(user).cloned().unwrap_or_default();
            let devices = devices
                .into_iter()
                .filter(|(d, _)| wanted.is_empty() || wanted.contains(d))
                .collect();
            response.device_keys.insert(user.clone(), devices);
        }
        response
    }

    /// `PUT /sendToDevice`: puts each message into its recipients' inboxes.
    pub fn send_to_device(&self, sender: &UserId, request: &ToDeviceRequest) {
        let mut state = self.state();
        for (user, messages) in &request.messages {
            for (target, content) in messages {
                let devices: Vec<OwnedDeviceId> = match target {
                    DeviceIdOrAllDevices::DeviceId(d) => vec![d.clone()],
                    DeviceIdOrAllDevices::AllDevices => state
                        .device_keys
                        .get(user)
                        .map(|d| d.keys().cloned().collect())
                        .unwrap_or_default(),
                };
                let content: Value =
                    serde_json::from_str(content.json().get()).unwrap_or(Value::Null);
                for device in devices {
                    state
                        .inbox
                        .entry((user.clone(), device))
                        .or_default()
                        .push(json!({
                            "sender": sender,
                            "type": request.event_type.to_string(),
                            "content": content,
                        }));
                }
            }
        }
    }

    /// `GET /sync` for a device: its to-device messages and keyclaim's E2EE
    /// key fields. With `fallback_support` off, the answer lacks
    /// `device_unused_fallback_key_types`, as from a server without fallback
    /// key support.
    ///
    /// # Panics
    /// When keyclaim fails.
    pub async fn sync(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        fallback_support: bool,
    ) -> sync_events::v3::Response {
        let (events, next_batch) = {
            let mut state = self.state();
            state.next_batch += 1;
            let events = state
                .inbox
                .remove(&(user_id.to_owned(), device_id.to_owned()))
                .unwrap_or_default();
            (events, format!("s{}", state.next_batch))
        };
        let mut response = match self.transport {
            Transport::Json => {
                let mut body = self
                    .keys
                    .sync(user_id.as_str(), device_id.as_str())
                    .await
                    .unwrap_or_else(|e| panic!("keyclaim sync: {e}"));
                body["next_batch"] = json!(next_batch);
                body["to_device"] = json!({ "events": events });
                sync_events::v3::Response::try_from_http_response(http_ok(&body))
                    .expect("ruma parses keyclaim's sync fields")
            }
            Transport::Ruma => {
                let fields = self
                    .keys
                    .sync_ruma(user_id, device_id)
                    .await
                    .unwrap_or_else(|e| panic!("keyclaim sync: {e}"));
                let mut response = sync_events::v3::Response::new(next_batch);
                fields.apply_to(&mut response);
                response.to_device.events = events
                    .iter()
                    .map(|e| Raw::from_json_string(e.to_string()).expect("JSON"))
                    .collect();
                response
            }
        };
        if !fallback_support {
            response.device_unused_fallback_key_types = None;
        }
        response
    }
}

/// What one sync did to a machine.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    /// The to-device events, decrypted where the machine could.
    pub to_device: Vec<ProcessedToDeviceEvent>,
    /// The room keys that arrived.
    pub room_keys: Vec<RoomKeyInfo>,
}

impl SyncOutcome {
    /// The types of the successfully decrypted to-device events.
    pub fn decrypted_types(&self) -> Vec<String> {
        self.to_device
            .iter()
            .filter_map(|e| match e {
                ProcessedToDeviceEvent::Decrypted { raw, .. } => {
                    raw.get_field::<String>("type").ok().flatten()
                }
                _ => None,
            })
            .collect()
    }

    /// How many to-device events could not be decrypted.
    pub fn undecryptable(&self) -> usize {
        self.to_device
            .iter()
            .filter(|e| matches!(e, ProcessedToDeviceEvent::UnableToDecrypt { .. }))
            .count()
    }
}

/// One client device: an `OlmMachine` and the request loop around it.
#[derive(Debug)]
pub struct Client {
    /// The machine.
    pub machine: OlmMachine,
    hs: Arc<Homeserver>,
}

/// The decryption settings of the tests: no cross-signing, so trust nobody
/// in particular.
pub fn decryption_settings() -> DecryptionSettings {
    DecryptionSettings {
        sender_device_trust_requirement: TrustRequirement::Untrusted,
    }
}

impl Client {
    /// A new device with a fresh `OlmMachine` (in-memory crypto store).
    pub async fn new(hs: &Arc<Homeserver>, user_id: &UserId, device_id: &DeviceId) -> Self {
        Self {
            machine: OlmMachine::new(user_id, device_id).await,
            hs: Arc::clone(hs),
        }
    }

    /// Sends every outgoing request of the machine to the homeserver and
    /// feeds the responses back, until the machine has nothing more to send.
    /// Returns the uploads made.
    ///
    /// # Panics
    /// When the machine or the homeserver fails.
    pub async fn send_outgoing_requests(&self) -> Vec<UploadRecord> {
        let before = self.hs.uploads().len();
        for _ in 0..10 {
            let requests = self.machine.outgoing_requests().await.expect("outgoing");
            if requests.is_empty() {
                break;
            }
            for request in requests {
                let id = request.request_id();
                match request.request() {
                    AnyOutgoingRequest::KeysUpload(upload) => {
                        let response = self
                            .hs
                            .keys_upload(self.machine.user_id(), self.machine.device_id(), upload)
                            .await;
                        self.machine
                            .mark_request_as_sent(id, &response)
                            .await
                            .expect("upload");
                    }
                    AnyOutgoingRequest::KeysQuery(query) => {
                        let response = self.hs.keys_query(query);
                        self.machine
                            .mark_request_as_sent(id, &response)
                            .await
                            .expect("query");
                    }
                    AnyOutgoingRequest::ToDeviceRequest(to_device) => {
                        self.hs.send_to_device(self.machine.user_id(), to_device);
                        let response = send_event_to_device::v3::Response::new();
                        self.machine
                            .mark_request_as_sent(id, &response)
                            .await
                            .expect("to-device");
                    }
                    other => panic!("unexpected outgoing request {other:?}"),
                }
            }
        }
        self.hs.uploads().split_off(before)
    }

    /// Serves the machine's pending `/keys/upload` but loses the response on
    /// the way back (a timeout, a dropped connection): the machine is not
    /// told, so it sends the same keys again later. Returns the upload.
    pub async fn send_upload_and_lose_response(&self) -> Option<UploadRecord> {
        let requests = self.machine.outgoing_requests().await.expect("outgoing");
        for request in requests {
            if let AnyOutgoingRequest::KeysUpload(upload) = request.request() {
                self.hs
                    .keys_upload(self.machine.user_id(), self.machine.device_id(), upload)
                    .await;
                return self.hs.uploads().pop();
            }
        }
        None
    }

    /// Syncs once: keyclaim's E2EE fields and the to-device inbox go into
    /// `receive_sync_changes`.
    ///
    /// # Panics
    /// When the machine or the homeserver fails.
    pub async fn sync(&self) -> SyncOutcome {
        self.sync_with(true).await
    }

    /// Syncs once, with or without `device_unused_fallback_key_types`.
    ///
    /// # Panics
    /// When the machine or the homeserver fails.
    pub async fn sync_with(&self, fallback_support: bool) -> SyncOutcome {
        let response = self
            .hs
            .sync(
                self.machine.user_id(),
                self.machine.device_id(),
                fallback_support,
            )
            .await;
        let (to_device, room_keys) = self
            .machine
            .receive_sync_changes(
                EncryptionSyncChanges {
                    to_device_events: response.to_device.events.clone(),
                    changed_devices: &response.device_lists,
                    one_time_keys_counts: &response.device_one_time_keys_count,
                    unused_fallback_keys: response.device_unused_fallback_key_types.as_deref(),
                    next_batch_token: Some(response.next_batch.clone()),
                },
                &decryption_settings(),
            )
            .await
            .expect("receive_sync_changes");
        SyncOutcome {
            to_device,
            room_keys,
        }
    }

    /// Starts tracking users (as for the members of a shared room) and runs
    /// the resulting `/keys/query`.
    pub async fn track(&self, users: &[&UserId]) {
        self.machine
            .update_tracked_users(users.iter().copied())
            .await
            .expect("track users");
        self.send_outgoing_requests().await;
    }

    /// Claims one-time keys for the devices of `users` the machine has no
    /// Olm session with, as clients do before sharing a room key. Returns
    /// the claim served, if the machine made one.
    pub async fn claim_missing_sessions(&self, users: &[&UserId]) -> Option<ClaimRecord> {
        let (id, request) = self
            .machine
            .get_missing_sessions(users.iter().copied())
            .await
            .expect("get_missing_sessions")?;
        let response = self.hs.keys_claim(self.machine.device_id(), &request).await;
        self.machine
            .mark_request_as_sent(&id, &response)
            .await
            .expect("keys claim response");
        self.hs.claims().pop()
    }

    /// Shares a Megolm room key with `users` over Olm (to-device messages
    /// into their inboxes), as a client does before its first message in an
    /// encrypted room. Returns the number of to-device requests.
    pub async fn share_room_key(&self, room_id: &RoomId, users: &[&UserId]) -> usize {
        let requests = self
            .machine
            .share_room_key(
                room_id,
                users.iter().copied(),
                EncryptionSettings::default(),
            )
            .await
            .expect("share_room_key");
        for request in &requests {
            self.hs.send_to_device(self.machine.user_id(), request);
            let response = send_event_to_device::v3::Response::new();
            self.machine
                .mark_request_as_sent(&request.txn_id, &response)
                .await
                .expect("to-device sent");
        }
        requests.len()
    }

    /// Encrypts a text message for a room (the room key must be shared) and
    /// returns the `m.room.encrypted` event as the other side receives it.
    pub async fn encrypt_text(&self, room_id: &RoomId, text: &str) -> Value {
        let content = json!({ "msgtype": "m.text", "body": text });
        let raw = Raw::from_json_string(content.to_string()).expect("JSON");
        let result = self
            .machine
            .encrypt_room_event_raw(room_id, "m.room.message", &raw)
            .await
            .expect("encrypt");
        let content: Value = serde_json::from_str(result.content.json().get()).expect("JSON");
        json!({
            "type": "m.room.encrypted",
            "event_id": "$event:example.org",
            "sender": self.machine.user_id(),
            "origin_server_ts": 1_700_000_000_000u64,
            "room_id": room_id,
            "content": content,
        })
    }

    /// Decrypts a room event and returns its `content.body`.
    pub async fn decrypt_text(&self, room_id: &RoomId, event: &Value) -> String {
        let raw = Raw::from_json_string(event.to_string()).expect("JSON");
        let decrypted = self
            .machine
            .decrypt_room_event(&raw, room_id, &decryption_settings())
            .await
            .expect("Megolm decryption");
        let event: Value = serde_json::from_str(decrypted.event.json().get()).expect("JSON");
        event["content"]["body"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}
