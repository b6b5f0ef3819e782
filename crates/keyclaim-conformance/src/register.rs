//! How an area registers its cases: beside their functions, by writing them
//! inside one [`cases!`] block, so that a case cannot exist without being
//! stamped into a test by [`conformance_tests!`](crate::conformance_tests).

/// A capability that a case needs beyond the basic contract (see
/// [`Capabilities`](crate::Capabilities)); a case marked
/// `#[needs(Persistent)]` or `#[needs(Shared)]` is skipped, visibly, on a
/// backend that lacks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Capability {
    /// [`Capabilities::persistent`](crate::Capabilities::persistent).
    Persistent,
    /// [`Capabilities::shared`](crate::Capabilities::shared).
    Shared,
}

impl Capability {
    /// Why a case that needs this capability was skipped.
    pub const fn missing(self) -> &'static str {
        match self {
            Self::Persistent => "the backend is not persistent (Capabilities::persistent)",
            Self::Shared => "the backend has no shared handles (Capabilities::shared)",
        }
    }
}

/// One case of the suite, as its area registered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    /// The area: the module (and file) the case lives in.
    pub area: &'static str,
    /// The function's name; it starts with the rule it checks (`r3_4_...`
    /// checks R3.4, `r9_...` section 9).
    pub name: &'static str,
    /// The capability the case needs, if any.
    pub needs: Option<Capability>,
}

impl Case {
    /// `area::name`, the name of the test the case is stamped into.
    pub fn path(&self) -> String {
        format!("{}::{}", self.area, self.name)
    }
}

/// Registers the cases of one area. An area file writes its case functions
/// inside one invocation, after a `$` and the area's name:
///
/// ```text
/// cases! { $ durability;
///     /// R10.1: every acknowledged write survives closing and reopening.
///     #[needs(Persistent)]
///     pub async fn r10_1_writes_survive_reopen<F: StoreFactory>(f: &F) { ... }
///
///     /// R10.3: two handles on one store never hand out one key twice.
///     #[needs(Shared)]
///     pub async fn r10_3_shared_handles_never_double_issue<F: StoreFactory>(f: &F) { ... }
/// }
/// ```
///
/// It emits the functions unchanged (a case that `#[needs]` a capability
/// first checks it and reports a skip), a `CASES` constant listing them,
/// and an exported macro named after the area that stamps one `#[test]`
/// per case; [`conformance_tests!`](crate::conformance_tests) calls it.
/// The `$` is handed in because a macro cannot write one itself, and the
/// macro it defines needs one for its own argument.
///
/// rustfmt does not reach inside a macro's braces: keep the cases as it
/// would write them (renaming `cases! { $ area;` to `mod area {` for a
/// moment and running rustfmt on the file does it).
macro_rules! cases {
    (@need) => { None };
    (@need $need:ident) => { Some($crate::Capability::$need) };
    (
        $d:tt $area:ident;
        $(
            $(#[doc = $doc:literal])*
            $(#[needs($need:ident)])?
            pub async fn $case:ident<F: $bound:ident>($f:ident: &F) $body:block
        )*
    ) => {
        $(
            $(#[doc = $doc])*
            pub async fn $case<F: $bound>($f: &F) {
                $(
                    if !$crate::require(
                        $f,
                        $crate::Capability::$need,
                        concat!(stringify!($area), "::", stringify!($case)),
                    ) {
                        return;
                    }
                )?
                $body
            }
        )*

        /// The cases of this area, in the order they are written.
        pub const CASES: &[$crate::Case] = &[$(
            $crate::Case {
                area: stringify!($area),
                name: stringify!($case),
                needs: cases!(@need $($need)?),
            }
        ),*];

        #[doc(hidden)]
        #[macro_export]
        macro_rules! $area {
            (@stamp ($d factory:expr)) => {
                mod $area {
                    #[allow(unused_imports)]
                    use super::*;
                    $(
                        #[test]
                        fn $case() {
                            $d crate::run_case($d factory, |f| async move {
                                $d crate::$area::$case(&f).await
                            });
                        }
                    )*
                }
            };
        }
    };
}
