//! The example server on 127.0.0.1, driven over HTTP: in process (port 0),
//! and as the built binary.

// Scenario helpers are plain functions, not #[test]s: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use keyclaim::{KeyStore, KeysApi};
use keyclaim_axum_example::{MAX_SYNC_TIMEOUT_MS, STAND_IN_AUTH_HEADER, open_store, router};
use keyclaim_e2e::client::{OlmDevice, SIGNED_CURVE25519, claimed_keys};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ALICE: &str = "@alice:example.org";

/// Serves the router on 127.0.0.1 with a free port; returns its base URL.
async fn serve(store: Arc<dyn KeyStore>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router(KeysApi::new(store)))
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    fn new(base: String) -> Self {
        Self {
            base,
            client: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, who: Option<&str>, body: Vec<u8>) -> (StatusCode, Value) {
        let mut request = self
            .client
            .post(format!("{}/_matrix/client/v3/{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(who) = who {
            request = request.header(STAND_IN_AUTH_HEADER, who);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn upload(&self, who: &str, body: &Value) -> (StatusCode, Value) {
        self.post("keys/upload", Some(who), body.to_string().into_bytes())
            .await
    }

    async fn claim(&self, body: &Value) -> (StatusCode, Value) {
        self.post(
            "keys/claim",
            Some("@bob:example.org BOBDEV"),
            body.to_string().into_bytes(),
        )
        .await
    }

    async fn sync(&self, who: &str, query: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(format!("{}/_matrix/client/v3/sync{query}", self.base))
            .header(STAND_IN_AUTH_HEADER, who)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }
}

/// Real Olm over HTTP, for every backend the server offers.
#[tokio::test]
async fn real_keys_over_http_memory() {
    real_keys_over_http(open_store("memory:").await.unwrap()).await;
}

#[tokio::test]
async fn real_keys_over_http_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.sqlite3");
    real_keys_over_http(
        open_store(&format!("sqlite:{}", path.display()))
            .await
            .unwrap(),
    )
    .await;
}

#[tokio::test]
async fn real_keys_over_http_redb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    real_keys_over_http(
        open_store(&format!("redb:{}", path.display()))
            .await
            .unwrap(),
    )
    .await;
}

/// Alice uploads signed vodozemac keys, Bob claims them, verifies them and
/// opens sessions Alice can accept; `/sync` follows.
async fn real_keys_over_http(store: Arc<dyn KeyStore>) {
    let http = Http::new(serve(store).await);
    let mut alice = OlmDevice::new(ALICE, "ALICEDEV");
    let who = "@alice:example.org ALICEDEV";
    let (otks, ids) = alice.generate_one_time_keys(2);
    let (fallback, fallback_id) = alice.rotate_fallback_key();
    let body = json!({ "one_time_keys": otks, "fallback_keys": fallback, "device_keys": {} });
    let (status, counts) = http.upload(who, &body).await;
    assert_eq!(status, StatusCode::OK, "{counts}");
    assert_eq!(
        counts,
        json!({ "one_time_key_counts": { SIGNED_CURVE25519: 2 } })
    );

    let (status, sync) = http.sync(who, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sync["device_one_time_keys_count"][SIGNED_CURVE25519], 2);
    assert_eq!(
        sync["device_unused_fallback_key_types"],
        json!([SIGNED_CURVE25519])
    );
    assert!(sync["next_batch"].is_string());

    let claim = json!({ "one_time_keys": { ALICE: { "ALICEDEV": SIGNED_CURVE25519 } } });
    let mut sorted = ids.clone();
    sorted.sort();
    let expected = [
        sorted[0].clone(),
        sorted[1].clone(),
        fallback_id.clone(),
        fallback_id,
    ];
    for (round, want) in expected.iter().enumerate() {
        let (status, answer) = http.claim(&claim).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["failures"], json!({}));
        let keys = claimed_keys(&answer, ALICE, "ALICEDEV");
        let (key_id, key_json) = keys.into_iter().next().unwrap();
        assert_eq!(&key_id, want, "round {round}");
        let key = OlmDevice::verify_claimed_key(
            ALICE,
            "ALICEDEV",
            alice.signing_key(),
            &key_id,
            &key_json,
        )
        .unwrap();
        let bob = OlmDevice::new("@bob:example.org", "BOBDEV");
        let (_, message) = bob.open_session(alice.identity_key(), &key, "hi").unwrap();
        let (_, text) = alice.accept_session(bob.identity_key(), &message).unwrap();
        assert_eq!(text, "hi");
    }
    let (_, sync) = http.sync(who, "").await;
    assert_eq!(sync["device_one_time_keys_count"][SIGNED_CURVE25519], 0);
    assert_eq!(sync["device_unused_fallback_key_types"], json!([]));
}

/// Key reset (R13.2) on the stable and the unstable path.
#[tokio::test]
async fn key_reset_over_http() {
    let http = Http::new(serve(open_store("memory:").await.unwrap()).await);
    let who = format!("{ALICE} DEV");
    let keys = json!({"one_time_keys": {
        "signed_curve25519:A": "ka", "signed_curve25519:B": "kb", "signed_curve25519:C": "kc",
    }});
    assert_eq!(http.upload(&who, &keys).await.0, StatusCode::OK);
    let (status, body) = http
        .post(
            "keys/reset",
            Some(&who),
            json!({"key_ids": ["signed_curve25519:A"]})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"device_one_time_keys_count": {"signed_curve25519": 2}})
    );
    let response = reqwest::Client::new()
        .post(format!(
            "{}/_matrix/client/unstable/org.matrix.msc4162/keys/reset",
            http.base
        ))
        .header(STAND_IN_AUTH_HEADER, &who)
        .body(json!({"all": true}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"device_one_time_keys_count": {"signed_curve25519": 0}})
    );
    let (status, body) = http
        .post("keys/reset", Some(&who), b"{\"all\": 1}".to_vec())
        .await;
    assert_eq!(
        (status, &body["errcode"]),
        (StatusCode::BAD_REQUEST, &json!("M_BAD_JSON"))
    );
}

/// Errors come back as Matrix errors with the facade's status codes.
#[tokio::test]
async fn errors_are_matrix_errors() {
    let http = Http::new(serve(open_store("memory:").await.unwrap()).await);
    let who = "@alice:example.org ALICEDEV";

    let (status, body) = http.post("keys/upload", None, b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["errcode"], "M_MISSING_TOKEN");
    let (status, body) = http.post("keys/claim", None, b"{}".to_vec()).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN"))
    );

    let (status, body) = http
        .post("keys/upload", Some(who), b"{not json".to_vec())
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_NOT_JSON"))
    );

    let (status, body) = http
        .upload(who, &json!({ "one_time_keys": { "no-colon": "k" } }))
        .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_BAD_JSON"))
    );

    let (status, body) = http.upload("@not-a-user ALICEDEV", &json!({})).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::BAD_REQUEST, Some("M_INVALID_PARAM"))
    );

    // Over keyclaim's 1 MiB, and far over it (cut off by axum): M_TOO_LARGE.
    for size in [(1 << 20) + 1, 3 << 20] {
        let mut big = b"{\"x\":\"".to_vec();
        big.resize(size, b'a');
        big.extend_from_slice(b"\"}");
        let (status, body) = http.post("keys/upload", Some(who), big).await;
        assert_eq!(
            (status, body["errcode"].as_str()),
            (StatusCode::BAD_REQUEST, Some("M_TOO_LARGE")),
            "{size} bytes"
        );
    }
}

/// A long-polling `/sync` of Alice's device is woken by a claim of her keys
/// (R11.1): it answers well before its timeout, and its answer shows the
/// claim.
///
/// The poll's timeout is the longest the server grants (30 s); the answer
/// must come within half of it, a bound no working wake-up comes near and
/// no broken one (which answers only at the timeout) can meet. The test
/// cannot see when the server has begun to wait, so it claims one key at a
/// time until the poll answers: the first claim after the poll began to
/// wait wakes it.
#[tokio::test]
async fn long_poll_sync_sees_the_claim() {
    // Enough keys to go on claiming past the bound.
    const KEYS: u64 = 300;
    let http = Arc::new(Http::new(serve(open_store("memory:").await.unwrap()).await));
    let who = "@alice:example.org ALICEDEV";
    let keys: serde_json::Map<String, Value> = (0..KEYS)
        .map(|i| (format!("signed_curve25519:K{i:03}"), json!("k")))
        .collect();
    let (status, _) = http.upload(who, &json!({ "one_time_keys": keys })).await;
    assert_eq!(status, StatusCode::OK);

    let poller = Arc::clone(&http);
    let query = format!("?since=s1&timeout={MAX_SYNC_TIMEOUT_MS}");
    let started = tokio::time::Instant::now();
    let mut poll = tokio::spawn(async move { poller.sync(who, &query).await });
    let bound = started + std::time::Duration::from_millis(MAX_SYNC_TIMEOUT_MS / 2);
    let mut claimed = 0;
    let answer = loop {
        assert!(claimed < KEYS, "every key claimed and the poll still waits");
        let (status, _) = http
            .claim(&json!({ "one_time_keys": { ALICE: { "ALICEDEV": SIGNED_CURVE25519 } } }))
            .await;
        assert_eq!(status, StatusCode::OK);
        claimed += 1;
        let pause = tokio::time::sleep(std::time::Duration::from_millis(100));
        tokio::select! {
            answer = &mut poll => break answer.unwrap(),
            () = pause => {}
        }
        assert!(
            tokio::time::Instant::now() < bound,
            "no answer within {} ms of a {MAX_SYNC_TIMEOUT_MS} ms long-poll, \
             {claimed} claims after it began: the claims did not wake it",
            MAX_SYNC_TIMEOUT_MS / 2
        );
    };
    let (status, sync) = answer;
    assert_eq!(status, StatusCode::OK);
    // The count after one of the claims: some claimed, none since the last.
    let count = sync["device_one_time_keys_count"][SIGNED_CURVE25519]
        .as_u64()
        .unwrap();
    assert!(
        (KEYS - claimed..KEYS).contains(&count),
        "the answer shows {count} keys, after {claimed} claims of {KEYS} keys"
    );
}

/// Kills the child server when the test ends, however it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The built binary, started with `--listen 127.0.0.1:0 --store memory:`,
/// serves over HTTP at the address it prints.
#[tokio::test]
async fn the_binary_serves_http() {
    let child = Command::new(env!("CARGO_BIN_EXE_keyclaim-axum-example"))
        .args(["--listen", "127.0.0.1:0", "--store", "memory:"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    let stdout = guard.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    let http = Http::new(base);
    let who = "@alice:example.org ALICEDEV";
    let (status, counts) = http
        .upload(
            who,
            &json!({ "one_time_keys": { "signed_curve25519:A": "k" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{counts}");
    assert_eq!(counts["one_time_key_counts"][SIGNED_CURVE25519], 1);
    let (_, answer) = http
        .claim(&json!({ "one_time_keys": { ALICE: { "ALICEDEV": SIGNED_CURVE25519 } } }))
        .await;
    assert_eq!(
        answer["one_time_keys"][ALICE]["ALICEDEV"]["signed_curve25519:A"],
        "k"
    );
    drop(guard);
}
