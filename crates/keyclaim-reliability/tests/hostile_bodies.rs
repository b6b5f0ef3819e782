//! Hostile bodies for the facade's newer endpoints (huge `key_ids` and device
//! lists, deep nesting, enormous and bad IDs): each gets its 400 from
//! contract section 9's table, or is served, and nothing changes.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used)]

use keyclaim_reliability::hostile;

#[test]
fn hostile_bodies_get_their_answers_and_change_nothing() {
    let failures: Vec<String> = hostile::CASES
        .iter()
        .filter_map(|case| hostile::check(case).err().map(|v| v.to_string()))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every endpoint has at least one case refused for each kind of fault:
/// a limit, bad JSON and (where IDs are named) a bad ID.
#[test]
fn every_endpoint_has_hostile_cases() {
    use hostile::Endpoint::*;
    for (endpoint, codes) in [
        (ClaimWith, &["M_TOO_LARGE", "M_BAD_JSON", "M_NOT_JSON"][..]),
        (Reset, &["M_TOO_LARGE", "M_BAD_JSON", "M_NOT_JSON"][..]),
        (ReplaceDehydrated, &["M_TOO_LARGE", "M_BAD_JSON"][..]),
        (
            CountsMany,
            &["M_TOO_LARGE", "M_BAD_JSON", "M_INVALID_PARAM"][..],
        ),
    ] {
        for code in codes {
            assert!(
                hostile::CASES
                    .iter()
                    .any(|c| c.endpoint == endpoint && c.refused_with == Some(*code)),
                "no {code} case for {endpoint:?}"
            );
        }
    }
}
