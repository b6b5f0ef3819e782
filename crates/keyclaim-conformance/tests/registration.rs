//! Every case of the suite is registered, so that `conformance_tests!`
//! stamps it into a test: a case cannot exist and never run. The cases are
//! read from the source of the area files and compared with what the areas
//! registered (the list `conformance_tests!` stamps from).

// A test: a failed assertion is how it reports.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use keyclaim_conformance::{Capability, Case};

/// The files of `src/` that are not areas: the machinery and the helpers.
/// Every other file is an area and writes its cases inside `cases!`.
const NOT_AREAS: &[&str] = &["lib", "register", "factory", "fixtures", "model"];

/// The `pub async fn` items of one area file, by name, each with the text
/// from its signature to the next one (its body, for the capability check).
fn case_functions(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("pub async fn ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push((name, String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// The area files' case functions, as `area::case`, with their bodies.
fn functions_in_source() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut areas = 0;
    for entry in std::fs::read_dir(&src).expect("read src/") {
        let path = entry.expect("a src/ entry").path();
        let Some(area) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|_| path.extension().is_some_and(|e| e == "rs"))
        else {
            continue;
        };
        if NOT_AREAS.contains(&area) {
            continue;
        }
        areas += 1;
        let text = std::fs::read_to_string(&path).expect("read an area file");
        for (name, body) in case_functions(&text) {
            out.insert(format!("{area}::{name}"), body);
        }
    }
    assert!(
        areas > 10,
        "found only {areas} area files in {}",
        src.display()
    );
    out
}

#[test]
fn every_case_function_is_registered_and_so_run() {
    let in_source = functions_in_source();
    let registered: BTreeMap<String, Case> = keyclaim_conformance::registered_cases!()
        .into_iter()
        .map(|c| (c.path(), c))
        .collect();
    let unregistered: Vec<_> = in_source
        .keys()
        .filter(|c| !registered.contains_key(*c))
        .collect();
    assert!(
        unregistered.is_empty(),
        "case functions that no test runs (write them inside the area's `cases!` block, \
         and name the area in `conformance_tests!`): {unregistered:?}"
    );
    let without_function: Vec<_> = registered
        .keys()
        .filter(|c| !in_source.contains_key(*c))
        .collect();
    assert!(
        without_function.is_empty(),
        "registered under another area than their file: {without_function:?}"
    );
    assert!(registered.len() > 50, "{} cases", registered.len());
}

#[test]
fn cases_that_reopen_or_share_need_the_capability() {
    let in_source = functions_in_source();
    let mut wrong = Vec::new();
    for case in keyclaim_conformance::registered_cases!() {
        let body = &in_source[&case.path()];
        for (call, capability) in [
            (".reopen(", Capability::Persistent),
            (".open_shared(", Capability::Shared),
        ] {
            if body.contains(call) && case.needs != Some(capability) {
                wrong.push(format!(
                    "{} calls {call}) without #[needs({capability:?})]",
                    case.path()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn case_functions_are_read_from_the_source() {
    let text = "cases! { $ a;\n    /// Doc.\n    pub async fn r1_1_x<F: StoreFactory>(f: &F) {\n        f.reopen(s);\n    }\n}\n\nasync fn helper() {}\npub async fn r1_2_y<F: StoreFactory>(f: &F) {}\n";
    let found = case_functions(text);
    let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["r1_1_x", "r1_2_y"]);
    assert!(found[0].1.contains(".reopen("));
}
