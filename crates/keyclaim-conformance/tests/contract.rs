//! The contract (`docs/contract.md`) and the repository agree: every rule
//! has a conformance case named after it, or a stated reason on
//! [`NO_CASE_YET`], and no file cites a rule number the contract does not
//! define.

// A test: a failed assertion is how it reports.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The rules that have no conformance case, each with where it is checked
/// instead or why it is not yet. This list only shrinks: a rule that gains a
/// case (a function `r<section>_<n>_...` in an area of the suite) must leave
/// it, and the test below fails until it does.
#[rustfmt::skip]
const NO_CASE_YET: &[(&str, &str)] = &[
    ("R10.4", "needs a failing store: keyclaim's tests/facade_faults.rs and the backends' fault tests"),
    ("R10.5", "needs a tuned server: PostgreSQL's tests/server_settings.rs"),
    ("R10.6", "needs a stalled writer: SQLite's tests/overload.rs and redb's stalled-writer tests"),
    ("R10.7", "needs corrupted storage: SQLite's tests/corrupt.rs and redb's corruption tests"),
    ("R10.8", "needs a failing disk: keyclaim-reliability's storage_faults and redb's faults tests"),
    ("R10.9", "backend-specific: PostgreSQL's tests/postgres.rs runs migrations from several workers"),
    ("R11.2", "needs several processes: PostgreSQL's tests/postgres.rs and SQLite's tests/multiprocess.rs"),
];

/// A rule number, `R<section>.<n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rule {
    section: u32,
    n: u32,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "R{}.{}", self.section, self.n)
    }
}

impl Rule {
    /// Parses `R<section>.<n>` exactly.
    fn parse(s: &str) -> Option<Rule> {
        let (rule, rest) = cited_at(s.as_bytes(), 0)?;
        (rest == s.len()).then_some(rule)
    }
}

fn digits(b: &[u8], at: usize) -> Option<(u32, usize)> {
    let end = at + b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
    let n = std::str::from_utf8(&b[at..end]).ok()?.parse().ok()?;
    Some((n, end))
}

/// The rule cited at `at` (an `R` followed by `<digits>.<digits>` and then
/// no further digit), with the index just past it.
fn cited_at(b: &[u8], at: usize) -> Option<(Rule, usize)> {
    if b.get(at) != Some(&b'R') {
        return None;
    }
    let (section, dot) = digits(b, at + 1)?;
    if b.get(dot) != Some(&b'.') {
        return None;
    }
    let (n, end) = digits(b, dot + 1)?;
    Some((Rule { section, n }, end))
}

/// Every rule number cited in `text`, with its line number: an `R` that does
/// not continue a word, then `<digits>.<digits>`.
fn citations(text: &str) -> Vec<(usize, Rule)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let b = line.as_bytes();
        for at in 0..b.len() {
            let starts_word = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_');
            if starts_word && let Some((rule, _)) = cited_at(b, at) {
                out.push((i + 1, rule));
            }
        }
    }
    out
}

/// The workspace's root (two levels above this crate).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The contract: its section numbers, in order, and its rules, each with
/// the section it is written under. Panics when a rule is defined twice,
/// under another section, or out of order.
struct Contract {
    sections: Vec<u32>,
    rules: BTreeSet<Rule>,
}

fn contract() -> Contract {
    let path = root().join("docs/contract.md");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut sections = Vec::new();
    let mut rules = BTreeSet::new();
    let mut last: Option<Rule> = None;
    for (i, line) in text.lines().enumerate() {
        let at = i + 1;
        if let Some(heading) = line.strip_prefix("## ") {
            let number = heading.split('.').next().and_then(|n| n.parse().ok());
            let number = number
                .unwrap_or_else(|| panic!("contract.md:{at}: a section heading is `## <n>. ...`"));
            sections.push(number);
            continue;
        }
        // A rule is defined by a paragraph that starts with `**R<s>.<n>**`.
        let Some(head) = line.strip_prefix("**") else {
            continue;
        };
        let Some(rule) = head.split("**").next().and_then(Rule::parse) else {
            continue;
        };
        assert_eq!(
            Some(&rule.section),
            sections.last(),
            "contract.md:{at}: {rule} is written under another section"
        );
        let expected = match last {
            Some(prev) if prev.section == rule.section => prev.n + 1,
            _ => 1,
        };
        assert_eq!(
            rule.n, expected,
            "contract.md:{at}: {rule} is out of order (the rules of a section are numbered 1, 2, ...)"
        );
        assert!(
            rules.insert(rule),
            "contract.md:{at}: {rule} is defined twice"
        );
        last = Some(rule);
    }
    Contract { sections, rules }
}

/// What a case's name says it checks: `r3_4_...` is R3.4, `r9_...` section 9
/// as a whole, anything else nothing.
enum Names {
    Rule(Rule),
    Section(u32),
    Nothing,
}

fn named(case: &str) -> Names {
    let mut parts = case.split('_');
    let Some(section) = parts
        .next()
        .and_then(|p| p.strip_prefix('r'))
        .and_then(|p| p.parse().ok())
    else {
        return Names::Nothing;
    };
    match parts.next().and_then(|p| p.parse().ok()) {
        Some(n) => Names::Rule(Rule { section, n }),
        None => Names::Section(section),
    }
}

#[test]
fn the_contract_has_sections_1_to_17() {
    let contract = contract();
    assert_eq!(contract.sections, (1..=17).collect::<Vec<_>>());
    for section in (2..=17).filter(|s| *s != 9) {
        assert!(
            contract.rules.iter().any(|r| r.section == section),
            "section {section} defines no rule"
        );
    }
    assert!(
        !contract
            .rules
            .iter()
            .any(|r| r.section == 1 || r.section == 9),
        "sections 1 (terms) and 9 (the facade, with its error table) have no numbered rules"
    );
}

#[test]
fn every_rule_has_a_case_or_a_reason() {
    let contract = contract();
    let cases = keyclaim_conformance::registered_cases!();
    let mut problems = String::new();

    let mut covered: BTreeMap<Rule, Vec<String>> = BTreeMap::new();
    for case in &cases {
        match named(case.name) {
            Names::Rule(rule) if contract.rules.contains(&rule) => {
                covered.entry(rule).or_default().push(case.path());
            }
            Names::Rule(rule) => {
                let _ = writeln!(
                    problems,
                    "case {} is named after {rule}, which the contract does not define",
                    case.path()
                );
            }
            Names::Section(s) if contract.rules.iter().any(|r| r.section == s) => {
                let _ = writeln!(
                    problems,
                    "case {} is named after section {s}, which has numbered rules: name the rule",
                    case.path()
                );
            }
            Names::Section(s) if !contract.sections.contains(&s) => {
                let _ = writeln!(
                    problems,
                    "case {} is named after section {s}, which the contract does not have",
                    case.path()
                );
            }
            Names::Section(_) | Names::Nothing => {}
        }
    }

    let mut listed = BTreeSet::new();
    for (text, reason) in NO_CASE_YET {
        let Some(rule) = Rule::parse(text) else {
            let _ = writeln!(problems, "NO_CASE_YET: `{text}` is not a rule number");
            continue;
        };
        if !listed.insert(rule) {
            let _ = writeln!(problems, "NO_CASE_YET names {rule} twice");
        }
        if reason.trim().is_empty() {
            let _ = writeln!(problems, "NO_CASE_YET gives no reason for {rule}");
        }
        if !contract.rules.contains(&rule) {
            let _ = writeln!(
                problems,
                "NO_CASE_YET names {rule}, which the contract does not define"
            );
        }
        if let Some(cases) = covered.get(&rule) {
            let _ = writeln!(
                problems,
                "{rule} has a case now ({}): take it off NO_CASE_YET",
                cases.join(", ")
            );
        }
    }

    for rule in &contract.rules {
        if !covered.contains_key(rule) && !listed.contains(rule) {
            let _ = writeln!(
                problems,
                "{rule} has no case (a function `r{}_{}_...` in an area) and is not on NO_CASE_YET",
                rule.section, rule.n
            );
        }
    }
    assert!(problems.is_empty(), "\n{problems}");
    assert!(
        covered.len() > NO_CASE_YET.len(),
        "most rules have a case ({} do)",
        covered.len()
    );
}

/// The files whose rule citations are checked: `*.rs`, `*.md`, `*.toml` and
/// `*.sh` under `crates/`, `benches/`, `examples/`, `fuzz/` (but its corpus)
/// and `docs/`, and the root README; never a `target` directory.
fn cited_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                let skipped = name == "target"
                    || name.starts_with('.')
                    || (name == "corpus" && dir.ends_with("fuzz"));
                if !skipped {
                    walk(&path, out);
                }
            } else if ["rs", "md", "toml", "sh"]
                .iter()
                .any(|ext| path.extension().is_some_and(|e| e == *ext))
            {
                out.push(path);
            }
        }
    }
    let root = root();
    let mut out = vec![root.join("README.md")];
    for dir in ["crates", "benches", "examples", "fuzz", "docs"] {
        walk(&root.join(dir), &mut out);
    }
    out
}

#[test]
fn no_file_cites_a_rule_the_contract_does_not_define() {
    let contract = contract();
    let root = root();
    let files = cited_files();
    let mut bad = String::new();
    let mut cited = 0;
    for path in &files {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for (line, rule) in citations(&text) {
            cited += 1;
            if !contract.rules.contains(&rule) {
                let shown = path.strip_prefix(&root).unwrap_or(path);
                let _ = writeln!(bad, "{}:{line}: {rule}", shown.display());
            }
        }
    }
    assert!(
        bad.is_empty(),
        "rule numbers that docs/contract.md does not define:\n{bad}"
    );
    // The walk reached the suite itself, whose cases cite their rules.
    assert!(
        files
            .iter()
            .any(|p| p.ends_with("keyclaim-conformance/src/claim.rs"))
    );
    assert!(cited > 0, "no citation found in {} files", files.len());
}

#[test]
fn citations_are_found_where_they_are_and_only_there() {
    let (section, n) = (3, 4);
    let text = format!(
        "a (R{section}.{n}) b\nR{section}.{n}, R1{n}.{section}0 and R{n}.{section}.\n\
         PR{section}.{n} xR{section}.{n} R{section} R{section}. R.{n}"
    );
    let found: Vec<String> = citations(&text)
        .into_iter()
        .map(|(line, rule)| format!("{line}:{rule}"))
        .collect();
    // Spelled with `format!` so that this file cites no rule it means to be
    // unknown.
    let expected = [
        format!("1:R{section}.{n}"),
        format!("2:R{section}.{n}"),
        format!("2:R1{n}.{section}0"),
        format!("2:R{n}.{section}"),
    ];
    assert_eq!(found, expected);
    assert_eq!(
        Rule::parse("R10.9").map(|r| (r.section, r.n)),
        Some((10, 9))
    );
    assert_eq!(Rule::parse("R10.9x"), None);
    assert!(matches!(
        named("r3_4_issued_key_is_not_stored_again"),
        Names::Rule(Rule { section: 3, n: 4 })
    ));
    assert!(matches!(named("r9_sync_fields"), Names::Section(9)));
    assert!(matches!(
        named("model_random_operation_sequences"),
        Names::Nothing
    ));
}
