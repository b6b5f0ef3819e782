#![doc = include_str!("../README.md")]
// A test suite: a failed assertion is how it reports, so panics are its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod factory;
pub mod fixtures;
pub mod model;

pub mod claim;
pub mod concurrency;
pub mod counts;
pub mod deletion;
pub mod durability;
pub mod export;
pub mod fallback;
pub mod limits;
pub mod model_based;
pub mod notify;
pub mod upload;
pub mod validation;
pub mod wire;

use std::future::Future;
use std::io::Write as _;

pub use factory::{Capabilities, DynFactory, DynStore, StoreFactory, unsupported};
pub use keyclaim;

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

/// Whether the factory is persistent; reports the skip when it is not.
pub fn require_persistent<F: StoreFactory>(f: &F, case: &str) -> bool {
    let ok = f.capabilities().persistent;
    if !ok {
        report_skip(
            case,
            "the backend is not persistent (Capabilities::persistent)",
        );
    }
    ok
}

/// Whether the factory gives shared handles; reports the skip when not.
pub fn require_shared<F: StoreFactory>(f: &F, case: &str) -> bool {
    let ok = f.capabilities().shared;
    if !ok {
        report_skip(
            case,
            "the backend has no shared handles (Capabilities::shared)",
        );
    }
    ok
}

/// The names of the cases that need a capability `caps` lacks, as
/// `area::case`, so that a backend's run can list what it skipped.
pub fn skipped_cases(caps: Capabilities) -> Vec<&'static str> {
    let mut out = Vec::new();
    if !caps.persistent {
        out.extend_from_slice(durability::PERSISTENT_CASES);
    }
    if !caps.shared {
        out.extend_from_slice(durability::SHARED_CASES);
        out.extend_from_slice(counts::SHARED_CASES);
        out.extend_from_slice(concurrency::SHARED_CASES);
    }
    out
}

/// Stamps the whole conformance suite into one `#[test]` per case.
///
/// Give it an expression that builds a [`StoreFactory`]; it is evaluated once
/// per case, inside a module the macro generates, so name your items by
/// absolute paths (`crate::...`). Invoke it inside a `#[cfg(test)]` module of your backend crate
/// (with `keyclaim-conformance` as a dev-dependency, nothing else needed):
///
/// ```ignore
/// #[cfg(test)]
/// mod conformance {
///     keyclaim_conformance::conformance_tests!(crate::tests::MyFactory::new());
/// }
/// ```
///
/// Each case becomes `<area>::<case>`, named after the SPEC rule it checks,
/// e.g. `claim::r4_3_concurrent_claims_never_under_issue`. Cases whose
/// capability the backend lacks print `SKIPPED` on stderr and pass; the test
/// `skipped_cases_report` lists them all.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases ($factory)
            validation {
                r2_1_invalid_user_ids_are_rejected
                r2_2_invalid_device_ids_are_rejected
                r2_3_invalid_key_ids_are_rejected
                r2_4_invalid_key_json_is_rejected
                r2_5_key_json_is_returned_unchanged
                r2_6_invalid_upload_stores_nothing
                r2_6_invalid_claim_consumes_nothing
                r2_7_orders_are_byte_orders
            }
            upload {
                r3_1_upload_is_applied_whole
                r3_2_retried_upload_is_accepted_and_keeps_original
                r3_2_conflicting_reupload_is_rejected_whole
                r3_3_algorithms_and_namespaces_do_not_collide
                r3_4_issued_key_is_not_stored_again
                r3_4_issued_key_with_new_content_is_stored
                r3_4_conflict_check_comes_before_issued_check
                r3_4_remembers_at_least_1000_issued_keys
                r3_5_oldest_upload_is_issued_first
                r3_5_ties_inside_an_upload_break_by_key_id
                r3_6_two_fallback_keys_for_one_algorithm_are_rejected
                r3_7_fallback_only_upload_is_applied
                r3_8_upload_answers_counts
            }
            claim {
                r4_1_count_per_target
                r4_2_claimed_keys_are_removed
                r4_3_concurrent_claims_never_under_issue
                r4_3_concurrent_claims_with_fallback
                r4_4_fallback_when_no_otk_and_marked_used
                r4_5_count_beyond_available
                r4_6_nothing_to_hand_out_is_left_out
                r4_7_many_devices_in_one_claim
            }
            fallback {
                r5_1_new_fallback_replaces_and_is_unused
                r5_2_same_fallback_keeps_used_flag
                r5_2_same_key_under_other_id_is_kept
                r5_3_fallback_state_is_per_algorithm
                r5_4_otk_operations_leave_fallback_alone
            }
            counts {
                r6_1_counts_leave_out_zero_but_signed_curve25519
                r6_2_counts_are_exact_after_every_operation
                r6_2_counts_are_current_across_handles
                r6_3_unused_fallback_types_sorted_and_present
                r6_4_counts_do_not_depend_on_other_devices
            }
            deletion {
                r7_1_delete_device_removes_everything_of_it
                r7_2_delete_user_removes_all_devices
            }
            limits {
                r8_1_otks_per_device_algorithm
                r8_2_key_json_size
                r8_2_keys_per_upload
                r8_2_claim_targets
                r8_3_count_is_clamped
            }
            wire {
                r9_upload_fields
                r9_upload_answers_counts
                r9_claim_shape
                r9_claim_ignores_invalid_algorithm_strings
                r9_sync_fields
                r9_delete_device
                r9_error_table_stores_nothing
                r9_errors_never_contain_key_material
                r9_large_bodies_are_refused
            }
            durability {
                r10_1_writes_survive_reopen
                r10_2_invariants_hold_after_reopen
                r10_3_shared_handles_never_double_issue
            }
            concurrency {
                r4_2_concurrent_claims_never_double_issue
                concurrent_uploads_and_claims_on_one_device
                concurrent_claims_across_many_devices
                concurrent_claims_across_handles
            }
            notify {
                r11_1_mutations_report_changed_devices
                r11_1_subscribers_are_woken
            }
            export {
                export_import_round_trip
                export_pages_in_device_order
                copy_diff_and_check
            }
            model_based {
                model_random_operation_sequences
            }
        );

        #[test]
        fn skipped_cases_report() {
            let caps = $crate::StoreFactory::capabilities(&$factory);
            for case in $crate::skipped_cases(caps) {
                $crate::report_skip(case, "capability missing");
            }
        }
    };
    (@cases ($factory:expr) $($area:ident { $($case:ident)* })*) => {
        $(
            mod $area {
                #[allow(unused_imports)]
                use super::*;
                $(
                    #[test]
                    fn $case() {
                        $crate::run_case($factory, |f| async move {
                            $crate::$area::$case(&f).await
                        });
                    }
                )*
            }
        )*
    };
}
