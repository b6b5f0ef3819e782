//! A minimal Matrix client device built on a vodozemac `Account`: it makes
//! `/keys/upload` bodies the way matrix-rust-sdk does, verifies claimed keys,
//! and opens and accepts Olm sessions.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value, json};
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature, KeyId};

/// The algorithm clients upload their Curve25519 keys under.
pub const SIGNED_CURVE25519: &str = "signed_curve25519";

/// Why a claimed key or a message was refused.
#[derive(Debug)]
pub struct ClientError(pub String);

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClientError {}

fn err(message: impl Into<String>) -> ClientError {
    ClientError(message.into())
}

/// Matrix canonical JSON (object members sorted by code point, which for
/// UTF-8 is byte order; no insignificant whitespace). Written here rather
/// than taken from keyclaim, so that the two are checked against each other.
pub fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            let members: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical(v)))
                .collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", items.join(","))
        }
        scalar => scalar.to_string(),
    }
}

/// The bytes a Matrix signature covers: the canonical JSON of the object
/// without `signatures` and `unsigned`.
pub fn signing_bytes(object: &Map<String, Value>) -> String {
    let mut stripped = object.clone();
    stripped.remove("signatures");
    stripped.remove("unsigned");
    canonical(&Value::Object(stripped))
}

/// A key handed out by a claim, verified.
#[derive(Clone, Debug)]
pub struct VerifiedKey {
    /// Its key ID, e.g. `signed_curve25519:AAAAAAAAAAA`.
    pub key_id: String,
    /// The Curve25519 key.
    pub key: Curve25519PublicKey,
    /// Whether the signed JSON says `fallback: true`.
    pub fallback: bool,
}

/// One device of a user: a vodozemac account plus the user and device IDs it
/// signs with.
pub struct OlmDevice {
    /// The user ID.
    pub user_id: String,
    /// The device ID.
    pub device_id: String,
    /// The Olm account (identity keys, one-time keys, fallback keys).
    pub account: Account,
}

impl fmt::Debug for OlmDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OlmDevice")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl OlmDevice {
    /// A new device with fresh identity keys.
    pub fn new(user_id: &str, device_id: &str) -> Self {
        Self {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            account: Account::new(),
        }
    }

    /// The Curve25519 identity key (the sender key of its Olm messages).
    pub fn identity_key(&self) -> Curve25519PublicKey {
        self.account.curve25519_key()
    }

    /// The Ed25519 fingerprint key its keys are signed with.
    pub fn signing_key(&self) -> Ed25519PublicKey {
        self.account.ed25519_key()
    }

    /// A key object signed as matrix-rust-sdk signs it:
    /// `{"key": ..., ["fallback": true,] "signatures": {user: {"ed25519:DEVICE": sig}}}`,
    /// the signature over the canonical JSON of the object without
    /// `signatures`.
    pub fn signed_key(&self, key: &Curve25519PublicKey, fallback: bool) -> Value {
        let mut object = Map::new();
        object.insert("key".to_owned(), Value::String(key.to_base64()));
        if fallback {
            object.insert("fallback".to_owned(), Value::Bool(true));
        }
        self.sign(object)
    }

    /// Signs `object` as matrix-rust-sdk does: the signature over the
    /// canonical JSON of the object without `signatures`, added under
    /// `signatures.<user>.ed25519:<device>`.
    fn sign(&self, mut object: Map<String, Value>) -> Value {
        let signature = self.account.sign(signing_bytes(&object));
        object.insert(
            "signatures".to_owned(),
            json!({ &self.user_id: { format!("ed25519:{}", self.device_id): signature.to_base64() } }),
        );
        Value::Object(object)
    }

    /// The device's signed `device_keys` object, as clients upload it (and
    /// as a dehydrated device's `PUT /dehydrated_device` body carries it).
    pub fn device_keys(&self) -> Value {
        let mut object = Map::new();
        object.insert("user_id".to_owned(), json!(self.user_id));
        object.insert("device_id".to_owned(), json!(self.device_id));
        object.insert(
            "algorithms".to_owned(),
            json!(["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"]),
        );
        object.insert(
            "keys".to_owned(),
            json!({
                format!("curve25519:{}", self.device_id): self.identity_key().to_base64(),
                format!("ed25519:{}", self.device_id): self.signing_key().to_base64(),
            }),
        );
        self.sign(object)
    }

    fn key_id(id: KeyId) -> String {
        format!("{SIGNED_CURVE25519}:{}", id.to_base64())
    }

    /// Generates `count` one-time keys and returns the `one_time_keys` map of
    /// an upload body (key ID -> signed key), marking them published.
    /// The second value lists the key IDs in generation order.
    pub fn generate_one_time_keys(&mut self, count: usize) -> (Value, Vec<String>) {
        self.account.generate_one_time_keys(count);
        let mut keys: Vec<(KeyId, Curve25519PublicKey)> =
            self.account.one_time_keys().into_iter().collect();
        keys.sort_by_key(|(id, _)| *id);
        let ids = keys.iter().map(|(id, _)| Self::key_id(*id)).collect();
        let map: Map<String, Value> = keys
            .iter()
            .map(|(id, key)| (Self::key_id(*id), self.signed_key(key, false)))
            .collect();
        self.account.mark_keys_as_published();
        (Value::Object(map), ids)
    }

    /// Generates a new fallback key (vodozemac keeps the previous one too)
    /// and returns the `fallback_keys` map of an upload body and the key ID,
    /// marking it published.
    pub fn rotate_fallback_key(&mut self) -> (Value, String) {
        self.account.generate_fallback_key();
        let mut map = Map::new();
        let mut key_id = String::new();
        for (id, key) in self.account.fallback_key() {
            key_id = Self::key_id(id);
            map.insert(key_id.clone(), self.signed_key(&key, true));
        }
        self.account.mark_keys_as_published();
        (Value::Object(map), key_id)
    }

    /// Verifies one claimed key: its JSON shape, and the owner's signature
    /// over its canonical JSON without `signatures` (what clients do before
    /// they use a claimed key).
    ///
    /// # Errors
    /// When the JSON is not a signed key or the signature does not verify.
    pub fn verify_claimed_key(
        owner_user: &str,
        owner_device: &str,
        owner_signing_key: Ed25519PublicKey,
        key_id: &str,
        json: &Value,
    ) -> Result<VerifiedKey, ClientError> {
        let object = json
            .as_object()
            .ok_or_else(|| err(format!("{key_id}: not an object")))?;
        let signature = object
            .get("signatures")
            .and_then(|s| s.get(owner_user))
            .and_then(|s| s.get(format!("ed25519:{owner_device}")))
            .and_then(Value::as_str)
            .ok_or_else(|| err(format!("{key_id}: no signature of the owner")))?;
        let signature = Ed25519Signature::from_base64(signature)
            .map_err(|e| err(format!("{key_id}: bad signature encoding: {e}")))?;
        owner_signing_key
            .verify(signing_bytes(object).as_bytes(), &signature)
            .map_err(|e| err(format!("{key_id}: signature does not verify: {e}")))?;
        let key = object
            .get("key")
            .and_then(Value::as_str)
            .ok_or_else(|| err(format!("{key_id}: no key")))?;
        let key = Curve25519PublicKey::from_base64(key)
            .map_err(|e| err(format!("{key_id}: bad key: {e}")))?;
        let fallback = object.get("fallback") == Some(&Value::Bool(true));
        Ok(VerifiedKey {
            key_id: key_id.to_owned(),
            key,
            fallback,
        })
    }

    /// Opens an outbound Olm session to `their_identity_key` with a claimed
    /// key and encrypts `plaintext` as its first (pre-key) message.
    ///
    /// # Errors
    /// When vodozemac refuses the key or the encryption.
    pub fn open_session(
        &self,
        their_identity_key: Curve25519PublicKey,
        claimed: &VerifiedKey,
        plaintext: &str,
    ) -> Result<(Session, OlmMessage), ClientError> {
        let mut session = self
            .account
            .create_outbound_session(SessionConfig::version_1(), their_identity_key, claimed.key)
            .map_err(|e| err(format!("outbound session: {e}")))?;
        let message = session
            .encrypt(plaintext)
            .map_err(|e| err(format!("encrypt: {e}")))?;
        Ok((session, message))
    }

    /// Accepts a pre-key message: creates the inbound session (which removes
    /// the one-time key it used from the account) and returns it with the
    /// plaintext.
    ///
    /// # Errors
    /// When the message is not a pre-key message or its one-time key is not
    /// one this account holds (for instance because it was used before).
    pub fn accept_session(
        &mut self,
        their_identity_key: Curve25519PublicKey,
        message: &OlmMessage,
    ) -> Result<(Session, String), ClientError> {
        let OlmMessage::PreKey(pre_key) = message else {
            return Err(err("not a pre-key message"));
        };
        let result = self
            .account
            .create_inbound_session(SessionConfig::version_1(), their_identity_key, pre_key)
            .map_err(|e| err(format!("inbound session: {e}")))?;
        let plaintext =
            String::from_utf8(result.plaintext).map_err(|_| err("plaintext is not UTF-8"))?;
        Ok((result.session, plaintext))
    }
}

/// Reads a claim answer (`{"one_time_keys": {user: {device: {key_id: json}}}}`)
/// into the keys of one device, in the order the answer lists them.
pub fn claimed_keys(answer: &Value, user: &str, device: &str) -> BTreeMap<String, Value> {
    answer["one_time_keys"][user][device]
        .as_object()
        .map(|keys| keys.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}
