//! Hostile bodies for the facade's endpoints: uploads and claims (the
//! shapes that cost most to parse: a body full of small objects, long
//! strings, many members; the others are in [`crate::bounds`]), claims with
//! options (R12.4), key resets (R13.2), dehydrated device replacements
//! (R14.1) and bulk counts (R16.1). Huge `key_ids` and device lists, deep
//! nesting, enormous and bad IDs, small objects and long strings where they
//! are ignored and where they are read, each at and past the limits of
//! contract section 8.
//!
//! Each case states what the facade must answer: a 400 with an `errcode` of
//! section 9's table, or success. [`check`] serves a case over the store of
//! [`crate::wire::populated_store`] and checks that answer, that nothing
//! changed (every case here either is refused or asks for nothing the store
//! holds) and that the store is sound; this crate's tests run every case.
//! The `bounds` binary measures them too ([`crate::bounds`]).

use std::fmt::Write as _;
use std::sync::Arc;

use keyclaim::{ApiError, ClaimOptions, KeysApi, Limits};
use keyclaim_memory::MemoryStore;
use serde_json::Value;

use crate::util::{Violation, block_on, ensure, snapshot_all};
use crate::wire::{UPLOAD_DEVICE, UPLOAD_USER, check_error, check_sound, populated_store};

/// The endpoint a hostile body is sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// [`KeysApi::upload`] for [`UPLOAD_USER`]/[`UPLOAD_DEVICE`].
    Upload,
    /// [`KeysApi::claim`].
    Claim,
    /// [`KeysApi::claim_with`] with `always_include_fallback_keys`.
    ClaimWith,
    /// [`KeysApi::reset`] for [`UPLOAD_USER`]/[`UPLOAD_DEVICE`].
    Reset,
    /// [`KeysApi::replace_dehydrated_device`] of [`UPLOAD_USER`]'s device
    /// `DEHYDRATED`, with no previous device.
    ReplaceDehydrated,
    /// [`KeysApi::counts_many`].
    CountsMany,
}

/// One hostile request and the answer it must get.
#[derive(Clone, Copy, Debug)]
pub struct Hostile {
    /// The case's name (also a `bounds` case).
    pub name: &'static str,
    /// Where the body goes.
    pub endpoint: Endpoint,
    /// The `errcode` of the 400 it must get, or `None` when it must be
    /// served (changing nothing).
    pub refused_with: Option<&'static str>,
    /// The facade's limits, when not the defaults.
    pub limits: Option<fn() -> Limits>,
    /// Builds the body.
    pub body: fn() -> Vec<u8>,
}

/// The body limit (R8.2).
const MIB: usize = 1 << 20;

/// The default limits but a claim's targets, at most 1,000.
fn a_limit_of_1000_targets() -> Limits {
    let mut limits = Limits::default();
    limits.max_claim_targets = 1000;
    limits
}

/// How big a list body is: a number of items, or as many as fit in a number
/// of bytes.
#[derive(Clone, Copy)]
enum Size {
    Items(usize),
    Bytes(usize),
}

/// `head`, the items separated by commas, `tail`: as many items as `size`
/// says, in one pass.
fn list_body(head: &str, tail: &str, size: Size, item: impl Fn(usize, &mut String)) -> Vec<u8> {
    let mut body = String::from(head);
    let mut next = String::new();
    for i in 0.. {
        next.clear();
        if i > 0 {
            next.push(',');
        }
        item(i, &mut next);
        let fits = match size {
            Size::Items(n) => i < n,
            Size::Bytes(bytes) => body.len() + next.len() + tail.len() <= bytes,
        };
        if !fits {
            break;
        }
        body.push_str(&next);
    }
    body.push_str(tail);
    body.into_bytes()
}

fn key_ids(size: Size) -> Vec<u8> {
    list_body(r#"{"key_ids":["#, "]}", size, |i, out| {
        let _ = write!(out, "\"a:{i}\"");
    })
}

fn devices(size: Size) -> Vec<u8> {
    let head = format!(r#"{{"devices":{{"{UPLOAD_USER}":["#);
    list_body(&head, "]}}", size, |i, out| {
        let _ = write!(out, "\"D{i}\"");
    })
}

fn claim_targets(size: Size) -> Vec<u8> {
    list_body(r#"{"one_time_keys":{"#, "}}", size, |i, out| {
        let _ = write!(out, r#""@{i}:x":{{"D":"a"}}"#);
    })
}

fn tiny_keys(size: Size) -> Vec<u8> {
    list_body(r#"{"one_time_keys":{"#, "}}", size, |i, out| {
        let _ = write!(out, r#""a:{i}":"""#);
    })
}

/// `{"x":[{"a":1},{"a":1},...]}` inside `head` and `tail`, filling the body
/// limit: the worst case of a parse into a JSON tree (each small object
/// costs a map of its own there).
fn small_objects(head: &str, tail: &str) -> Vec<u8> {
    list_body(head, tail, Size::Bytes(MIB), |_, out| {
        out.push_str(r#"{"a":1}"#);
    })
}

/// A string of `len` bytes inside `head` and `tail`.
fn long_string(head: &str, len: usize, tail: &str) -> Vec<u8> {
    format!("{head}\"{}\"{tail}", "s".repeat(len)).into_bytes()
}

/// `depth` nested arrays.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// A body that is nothing but nested arrays, filling the body limit.
fn nested_body() -> Vec<u8> {
    nested(MIB / 2 - 1).into_bytes()
}

/// Every hostile case.
pub const CASES: &[Hostile] = &[
    Hostile {
        name: "reset_key_ids_over_body_limit",
        endpoint: Endpoint::Reset,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || key_ids(Size::Items(200_000)),
    },
    Hostile {
        name: "reset_key_ids_in_1mib",
        endpoint: Endpoint::Reset,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || key_ids(Size::Bytes(MIB)),
    },
    Hostile {
        name: "reset_1001_key_ids",
        endpoint: Endpoint::Reset,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || key_ids(Size::Items(1001)),
    },
    Hostile {
        name: "reset_1000_key_ids_last_bad",
        endpoint: Endpoint::Reset,
        refused_with: Some("M_BAD_JSON"),
        limits: None,
        body: || {
            list_body(r#"{"key_ids":["#, "]}", Size::Items(1000), |i, out| {
                let _ = match i {
                    999 => write!(out, r#""nocolon""#),
                    _ => write!(out, r#""signed_curve25519:AAAAAA{i}""#),
                };
            })
        },
    },
    Hostile {
        name: "reset_deep_nesting_in_key_ids",
        endpoint: Endpoint::Reset,
        refused_with: Some("M_BAD_JSON"),
        limits: None,
        body: || format!("{{\"key_ids\":{}}}", nested(120)).into_bytes(),
    },
    Hostile {
        name: "reset_deep_nesting_body",
        endpoint: Endpoint::Reset,
        refused_with: Some("M_NOT_JSON"),
        limits: None,
        body: nested_body,
    },
    Hostile {
        name: "reset_enormous_key_id",
        endpoint: Endpoint::Reset,
        refused_with: Some("M_BAD_JSON"),
        limits: None,
        body: || format!("{{\"key_ids\":[\"a:{}\"]}}", "n".repeat(MIB - 64)).into_bytes(),
    },
    Hostile {
        name: "claim_with_targets_in_1mib",
        endpoint: Endpoint::ClaimWith,
        refused_with: None,
        limits: None,
        body: || claim_targets(Size::Bytes(MIB)),
    },
    Hostile {
        name: "claim_with_1001_targets_over_a_limit_of_1000",
        endpoint: Endpoint::ClaimWith,
        refused_with: Some("M_TOO_LARGE"),
        limits: Some(a_limit_of_1000_targets),
        body: || claim_targets(Size::Items(1001)),
    },
    Hostile {
        name: "claim_10000_targets_last_user_bad",
        endpoint: Endpoint::Claim,
        refused_with: Some("M_INVALID_PARAM"),
        limits: None,
        body: || {
            list_body(
                r#"{"one_time_keys":{"#,
                "}}",
                Size::Items(10_000),
                |i, out| {
                    let _ = match i {
                        9_999 => write!(out, r#""nobody":{{"D":"a"}}"#),
                        _ => write!(out, r#""@{i}:x":{{"D":"a"}}"#),
                    };
                },
            )
        },
    },
    Hostile {
        name: "claim_one_user_1001_devices_over_a_limit_of_1000",
        endpoint: Endpoint::Claim,
        refused_with: Some("M_TOO_LARGE"),
        limits: Some(a_limit_of_1000_targets),
        body: || {
            list_body(
                r#"{"one_time_keys":{"@u:x":{"#,
                "}}}",
                Size::Items(1001),
                |i, out| {
                    let _ = write!(out, r#""D{i}":"a""#);
                },
            )
        },
    },
    Hostile {
        name: "claim_one_user_1000_devices_no_algorithm_a_string",
        endpoint: Endpoint::Claim,
        refused_with: Some("M_BAD_JSON"),
        limits: None,
        body: || {
            list_body(
                r#"{"one_time_keys":{"@u:x":{"#,
                "}}}",
                Size::Items(1000),
                |i, out| {
                    let _ = write!(out, r#""D{i}":1"#);
                },
            )
        },
    },
    Hostile {
        name: "claim_with_deep_nesting_in_algorithm",
        endpoint: Endpoint::ClaimWith,
        refused_with: Some("M_BAD_JSON"),
        limits: None,
        body: || {
            format!(
                "{{\"one_time_keys\":{{\"{UPLOAD_USER}\":{{\"{UPLOAD_DEVICE}\":{}}}}}}}",
                nested(120)
            )
            .into_bytes()
        },
    },
    Hostile {
        name: "claim_with_deep_nesting_body",
        endpoint: Endpoint::ClaimWith,
        refused_with: Some("M_NOT_JSON"),
        limits: None,
        body: nested_body,
    },
    Hostile {
        name: "replace_tiny_keys_in_1mib",
        endpoint: Endpoint::ReplaceDehydrated,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || tiny_keys(Size::Bytes(MIB)),
    },
    Hostile {
        name: "replace_deep_nesting_in_key",
        endpoint: Endpoint::ReplaceDehydrated,
        refused_with: Some("M_BAD_JSON"),
        limits: None,
        body: || {
            format!(
                "{{\"one_time_keys\":{{\"a:b\":{{\"key\":\"k\",\"signatures\":{{}},\"x\":{}}}}}}}",
                nested(120)
            )
            .into_bytes()
        },
    },
    Hostile {
        name: "replace_deep_nesting_in_device_data",
        endpoint: Endpoint::ReplaceDehydrated,
        refused_with: None,
        limits: None,
        body: || format!("{{\"device_data\":{}}}", nested(120)).into_bytes(),
    },
    Hostile {
        name: "replace_enormous_key_id",
        endpoint: Endpoint::ReplaceDehydrated,
        refused_with: Some("M_BAD_JSON"),
        limits: None,
        body: || {
            format!(
                "{{\"fallback_keys\":{{\"a:{}\":\"k\"}}}}",
                "n".repeat(MIB - 64)
            )
            .into_bytes()
        },
    },
    Hostile {
        name: "counts_many_devices_in_1mib",
        endpoint: Endpoint::CountsMany,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || devices(Size::Bytes(MIB)),
    },
    Hostile {
        name: "counts_many_10000_devices",
        endpoint: Endpoint::CountsMany,
        refused_with: None,
        limits: None,
        body: || devices(Size::Items(10_000)),
    },
    Hostile {
        name: "counts_many_10001_devices",
        endpoint: Endpoint::CountsMany,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || devices(Size::Items(10_001)),
    },
    Hostile {
        name: "counts_many_10000_devices_last_bad",
        endpoint: Endpoint::CountsMany,
        refused_with: Some("M_INVALID_PARAM"),
        limits: None,
        body: || {
            let head = format!(r#"{{"devices":{{"{UPLOAD_USER}":["#);
            list_body(&head, "]}}", Size::Items(10_000), |i, out| {
                let _ = match i {
                    9_999 => write!(out, r#""""#),
                    _ => write!(out, r#""D{i}""#),
                };
            })
        },
    },
    Hostile {
        name: "counts_many_deep_nesting_in_list",
        endpoint: Endpoint::CountsMany,
        refused_with: Some("M_BAD_JSON"),
        limits: None,
        body: || format!("{{\"devices\":{{\"{UPLOAD_USER}\":{}}}}}", nested(120)).into_bytes(),
    },
    Hostile {
        name: "counts_many_enormous_user_id",
        endpoint: Endpoint::CountsMany,
        refused_with: Some("M_INVALID_PARAM"),
        limits: None,
        body: || {
            format!(
                "{{\"devices\":{{\"@{}:x\":[\"D\"]}}}}",
                "u".repeat(MIB - 64)
            )
            .into_bytes()
        },
    },
    Hostile {
        name: "upload_small_objects_ignored_1mib",
        endpoint: Endpoint::Upload,
        refused_with: None,
        limits: None,
        body: || small_objects(r#"{"x":["#, "]}"),
    },
    Hostile {
        name: "upload_small_objects_in_device_keys_1mib",
        endpoint: Endpoint::Upload,
        refused_with: None,
        limits: None,
        body: || small_objects(r#"{"device_keys":{"x":["#, "]}}"),
    },
    Hostile {
        name: "upload_small_objects_in_one_key_1mib",
        endpoint: Endpoint::Upload,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || {
            small_objects(
                r#"{"one_time_keys":{"a:b":{"key":"k","signatures":{},"x":["#,
                "]}}}",
            )
        },
    },
    Hostile {
        name: "upload_members_in_one_key_1mib",
        endpoint: Endpoint::Upload,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || {
            list_body(
                r#"{"one_time_keys":{"a:b":{"key":"k","signatures":{},"#,
                "}}}",
                Size::Bytes(MIB),
                |i, out| {
                    let _ = write!(out, r#""m{i}":0"#);
                },
            )
        },
    },
    Hostile {
        name: "upload_long_string_in_one_key_1mib",
        endpoint: Endpoint::Upload,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || long_string(r#"{"one_time_keys":{"a:b":"#, MIB - 64, "}}"),
    },
    Hostile {
        name: "upload_long_string_ignored_1mib",
        endpoint: Endpoint::Upload,
        refused_with: None,
        limits: None,
        body: || long_string(r#"{"x":"#, MIB - 16, "}"),
    },
    Hostile {
        name: "upload_tiny_keys_in_1mib",
        endpoint: Endpoint::Upload,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || tiny_keys(Size::Bytes(MIB)),
    },
    Hostile {
        name: "upload_deep_nesting_body",
        endpoint: Endpoint::Upload,
        refused_with: Some("M_NOT_JSON"),
        limits: None,
        body: nested_body,
    },
    Hostile {
        name: "claim_small_objects_ignored_1mib",
        endpoint: Endpoint::Claim,
        refused_with: None,
        limits: None,
        body: || small_objects(r#"{"x":["#, "]}"),
    },
    Hostile {
        name: "claim_small_objects_as_algorithm_1mib",
        endpoint: Endpoint::Claim,
        refused_with: Some("M_BAD_JSON"),
        limits: None,
        body: || small_objects(r#"{"one_time_keys":{"@a:x":{"D":["#, "]}}}"),
    },
    Hostile {
        name: "claim_users_without_devices_1mib",
        endpoint: Endpoint::Claim,
        refused_with: None,
        limits: None,
        body: || {
            list_body(r#"{"one_time_keys":{"#, "}}", Size::Bytes(MIB), |i, out| {
                let _ = write!(out, r#""@{i}:x":{{}}"#);
            })
        },
    },
    Hostile {
        name: "claim_long_string_ignored_1mib",
        endpoint: Endpoint::Claim,
        refused_with: None,
        limits: None,
        body: || long_string(r#"{"timeout":"#, MIB - 16, "}"),
    },
    Hostile {
        name: "claim_with_small_objects_ignored_1mib",
        endpoint: Endpoint::ClaimWith,
        refused_with: None,
        limits: None,
        body: || small_objects(r#"{"x":["#, "]}"),
    },
    Hostile {
        name: "reset_small_objects_ignored_1mib",
        endpoint: Endpoint::Reset,
        refused_with: None,
        limits: None,
        body: || small_objects(r#"{"x":["#, "]}"),
    },
    Hostile {
        name: "reset_small_objects_in_key_ids_1mib",
        endpoint: Endpoint::Reset,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || small_objects(r#"{"key_ids":["#, "]}"),
    },
    Hostile {
        name: "replace_small_objects_ignored_1mib",
        endpoint: Endpoint::ReplaceDehydrated,
        refused_with: None,
        limits: None,
        body: || small_objects(r#"{"device_data":["#, "]}"),
    },
    Hostile {
        name: "replace_small_objects_in_one_key_1mib",
        endpoint: Endpoint::ReplaceDehydrated,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || {
            small_objects(
                r#"{"fallback_keys":{"a:b":{"key":"k","signatures":{},"x":["#,
                "]}}}",
            )
        },
    },
    Hostile {
        name: "counts_many_small_objects_ignored_1mib",
        endpoint: Endpoint::CountsMany,
        refused_with: None,
        limits: None,
        body: || small_objects(r#"{"x":["#, "]}"),
    },
    Hostile {
        name: "counts_many_users_without_devices_1mib",
        endpoint: Endpoint::CountsMany,
        refused_with: None,
        limits: None,
        body: || {
            list_body(r#"{"devices":{"#, "}}", Size::Bytes(MIB), |i, out| {
                let _ = write!(out, r#""@{i}:x":[]"#);
            })
        },
    },
    Hostile {
        name: "counts_many_small_objects_in_a_list_1mib",
        endpoint: Endpoint::CountsMany,
        refused_with: Some("M_TOO_LARGE"),
        limits: None,
        body: || {
            let head = format!(r#"{{"devices":{{"{UPLOAD_USER}":["#);
            small_objects(&head, "]}}")
        },
    },
];

/// The case of a name.
pub fn find(name: &str) -> Option<&'static Hostile> {
    CASES.iter().find(|c| c.name == name)
}

/// The facade over `store` a case is served by.
pub fn api(case: &Hostile, store: Arc<MemoryStore>) -> KeysApi<Arc<MemoryStore>> {
    let api = KeysApi::new(store);
    match case.limits {
        Some(limits) => api.with_limits(limits()),
        None => api,
    }
}

/// Sends `body` to the case's endpoint.
///
/// # Errors
/// The facade's answer when it refuses the request.
pub async fn serve(
    api: &KeysApi<Arc<MemoryStore>>,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<Value, ApiError> {
    match endpoint {
        Endpoint::Upload => api.upload(UPLOAD_USER, UPLOAD_DEVICE, body).await,
        Endpoint::Claim => api.claim(body).await,
        Endpoint::ClaimWith => {
            let options = ClaimOptions::default().always_include_fallback_keys(true);
            api.claim_with(body, &options).await
        }
        Endpoint::Reset => api.reset(UPLOAD_USER, UPLOAD_DEVICE, body).await,
        Endpoint::ReplaceDehydrated => {
            api.replace_dehydrated_device(UPLOAD_USER, None, "DEHYDRATED", body)
                .await
        }
        Endpoint::CountsMany => api.counts_many(body).await,
    }
}

/// Serves one case over a populated store: the answer must be the case's,
/// the state unchanged and the store sound.
///
/// # Errors
/// The first broken promise found.
pub fn check(case: &Hostile) -> Result<(), Violation> {
    block_on(async {
        let store = populated_store().await?;
        let api = api(case, store.clone());
        let body = (case.body)();
        let before = snapshot_all(&*store).await?;
        let result = serve(&api, case.endpoint, &body).await;
        let after = snapshot_all(&*store).await?;
        match (result, case.refused_with) {
            (Err(err), Some(code)) => {
                check_error(&err, &before, &after)?;
                ensure!(
                    err.errcode() == code,
                    "{}: refused with {err}, not {code}",
                    case.name
                );
            }
            (Ok(_), None) => ensure!(
                before == after,
                "{}: served, but the store changed",
                case.name
            ),
            (Err(err), None) => {
                return Err(Violation(format!("{}: refused with {err}", case.name)));
            }
            (Ok(_), Some(code)) => {
                return Err(Violation(format!(
                    "{}: served, not refused with {code}",
                    case.name
                )));
            }
        }
        check_sound(&store).await
    })?
}
