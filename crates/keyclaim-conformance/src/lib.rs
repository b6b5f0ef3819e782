#![doc = include_str!("../README.md")]
// A test suite: a failed assertion is how it reports, so panics are its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod register;
mod factory;
pub mod fixtures;
pub mod model;

// The areas, each a file of cases registered with `cases!`; every one of
// them is also named in `conformance_tests!` below.
pub mod claim;
pub mod concurrency;
pub mod counts;
pub mod dehydrated;
pub mod deletion;
pub mod durability;
pub mod export;
pub mod fallback;
pub mod import;
pub mod limits;
pub mod model_based;
pub mod notify;
pub mod reads;
pub mod reset;
pub mod split;
pub mod upload;
pub mod validation;
pub mod wire;

use std::future::Future;
use std::io::Write as _;

pub use factory::{Capabilities, DynFactory, DynStore, StoreFactory, unsupported};
pub use keyclaim;
pub use register::{Capability, Case};

/// Runs one case: builds a multi-threaded tokio runtime (so that concurrency
/// cases really run in parallel), gives the case the factory, and waits.
///
/// The [`conformance_tests!`] macro calls this once per case; call it directly
/// to run a single case with extra set-up.
pub fn run_case<F, C, Fut>(factory: F, case: C)
where
    F: StoreFactory,
    C: FnOnce(F) -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("build a tokio runtime for the conformance case");
    runtime.block_on(case(factory));
}

/// Reports a skipped case on the process's stderr, past the test harness's
/// output capture, so that skips are seen and never silent.
pub fn report_skip(case: &str, reason: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "keyclaim-conformance: SKIPPED {case}: {reason}"
    );
}

/// Whether the factory has `capability`; reports `case` as skipped when
/// it has not. Cases registered with `#[needs(..)]` call it first.
pub fn require<F: StoreFactory>(f: &F, capability: Capability, case: &str) -> bool {
    let ok = f.capabilities().has(capability);
    if !ok {
        report_skip(case, capability.missing());
    }
    ok
}

/// Stamps the whole conformance suite into one `#[test]` per case.
///
/// Give it an expression that builds a [`StoreFactory`]; it is evaluated once
/// per case, inside a module the macro generates, so name your items by
/// absolute paths (`crate::...`). Invoke it inside a `#[cfg(test)]` module of
/// your backend crate (with `keyclaim-conformance` as a dev-dependency,
/// nothing else needed):
///
/// ```ignore
/// #[cfg(test)]
/// mod conformance {
///     keyclaim_conformance::conformance_tests!(crate::tests::MyFactory::new());
/// }
/// ```
///
/// Each case becomes `<area>::<case>`, named after the contract rule it checks,
/// e.g. `claim::r4_3_concurrent_claims_never_under_issue`. Cases whose
/// capability the backend lacks print `SKIPPED` on stderr and pass; the test
/// `skipped_cases_report` lists them all.
#[macro_export]
macro_rules! conformance_tests {
    // The one list of areas (each registers its cases beside their
    // functions, see `register.rs`), handed to the arm named after `@areas`.
    (@areas $($then:tt)*) => {
        $crate::conformance_tests! {
            $($then)* [
                validation upload claim fallback counts deletion limits wire
                durability concurrency notify export split reset dehydrated reads import
                model_based
            ]
        }
    };
    (@stamp ($factory:expr) [$($area:ident)*]) => {
        $( $crate::$area!(@stamp ($factory)); )*

        #[test]
        fn skipped_cases_report() {
            let caps = $crate::StoreFactory::capabilities(&$factory);
            for case in $crate::conformance_tests!(@cases [$($area)*]) {
                if let Some(need) = case.needs
                    && !caps.has(need)
                {
                    $crate::report_skip(&case.path(), need.missing());
                }
            }
        }
    };
    (@cases [$($area:ident)*]) => {
        [$( $crate::$area::CASES ),*].concat()
    };
    ($factory:expr) => {
        $crate::conformance_tests!(@areas @stamp ($factory));
    };
}

/// Every registered case, in the order [`conformance_tests!`] stamps them,
/// as a `Vec<`[`Case`]`>`; the suite's own tests compare it with the case
/// functions in the source and with the contract's rules.
#[macro_export]
macro_rules! registered_cases {
    () => {
        $crate::conformance_tests!(@areas @cases)
    };
}
