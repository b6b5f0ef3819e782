//! The facade reads bodies member by member (no JSON tree); these pin what
//! section 9 says of repeated member names (the last occurrence counts) and
//! that key JSON comes back as the value uploaded (R2.5).
// A test: a failed expectation is how it reports.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use keyclaim::KeysApi;
use keyclaim_memory::MemoryStore;
use serde_json::{Value, json};

const USER: &str = "@alice:example.org";

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// A facade over a store where `USER`'s device `D` holds one key `alg:A`.
async fn api() -> KeysApi<Arc<MemoryStore>> {
    let api = KeysApi::new(Arc::new(MemoryStore::new()));
    api.upload(USER, "D", br#"{"one_time_keys":{"alg:A":"a"}}"#)
        .await
        .unwrap();
    api
}

fn claimed(answer: &Value) -> usize {
    answer["one_time_keys"].as_object().map_or(0, |users| {
        users
            .values()
            .map(|d| d.as_object().map_or(0, |d| d.len()))
            .sum()
    })
}

#[test]
fn repeated_names_count_their_last_occurrence() {
    run(async {
        // A device named twice: the last algorithm counts.
        let api = api().await;
        let body = json!({}).to_string();
        assert_eq!(claimed(&api.claim(body.as_bytes()).await.unwrap()), 0);
        let body = format!(r#"{{"one_time_keys":{{"{USER}":{{"D":5,"D":"alg"}}}}}}"#);
        assert_eq!(claimed(&api.claim(body.as_bytes()).await.unwrap()), 1);
        // A user named twice: the last device map counts, also when empty.
        let api = self::api().await;
        let body = format!(r#"{{"one_time_keys":{{"{USER}":{{"D":"alg"}},"{USER}":{{}}}}}}"#);
        assert_eq!(claimed(&api.claim(body.as_bytes()).await.unwrap()), 0);
        let body = format!(r#"{{"one_time_keys":{{"{USER}":{{}},"{USER}":{{"D":"alg"}}}}}}"#);
        assert_eq!(claimed(&api.claim(body.as_bytes()).await.unwrap()), 1);
        // Bulk counts: the last list of a user counts.
        let body = format!(r#"{{"devices":{{"{USER}":["D"],"{USER}":[]}}}}"#);
        assert_eq!(api.counts_many(body.as_bytes()).await.unwrap(), json!({}));
        // An upload: the last JSON of a key ID, and of a top-level member.
        let api = KeysApi::new(Arc::new(MemoryStore::new()));
        let body = br#"{"one_time_keys":5,"one_time_keys":{"alg:K":123,"alg:K":"k"}}"#;
        let answer = api.upload(USER, "E", body).await.unwrap();
        assert_eq!(answer["one_time_key_counts"]["alg"], json!(1));
    });
}

#[test]
fn key_json_comes_back_as_uploaded() {
    run(async {
        let api = KeysApi::new(Arc::new(MemoryStore::new()));
        let key = r#" { "signatures" : { "@a:b" : { "ed25519:D" : "s" } } , "key" : "k\u00e9\"\/" , "z" : [ 1e2 , -0 , 12345678901234567890 , { "b" : null , "a" : true } ] } "#;
        let body = format!(r#"{{"one_time_keys":{{"alg:K":{key}}}}}"#);
        api.upload(USER, "D", body.as_bytes()).await.unwrap();
        let claim = format!(r#"{{"one_time_keys":{{"{USER}":{{"D":"alg"}}}}}}"#);
        let answer = api.claim(claim.as_bytes()).await.unwrap();
        let want: Value = serde_json::from_str(key).unwrap();
        assert_eq!(answer["one_time_keys"][USER]["D"]["alg:K"], want);
    });
}
