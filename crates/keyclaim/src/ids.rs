//! Validated identifiers (contract section 2: R2.1 to R2.3).
//!
//! Every identifier is checked once, when it is built, so that the rest of the
//! crate and every backend can take it as valid. The types are thin wrappers
//! around `String` that order and compare by the bytes of their UTF-8 form
//! (R2.7).

use std::fmt;

use crate::error::{Error, Result};

/// The longest identifier part the contract accepts, in bytes (R2.1 to R2.3).
pub const MAX_ID_BYTES: usize = 255;

/// The algorithm whose OTK count is always reported, even at zero (R6.1).
pub const SIGNED_CURVE25519: &str = "signed_curve25519";

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The identifier as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(value: &str) -> Result<Self> {
                Self::parse(value)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(value: String) -> Result<Self> {
                Self::parse(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(value: &str) -> Result<Self> {
                Self::parse(value)
            }
        }
    };
}

string_newtype!(
    /// A Matrix user ID: `@localpart:server`, at most 255 bytes (R2.1).
    UserId
);
string_newtype!(
    /// A device ID: non-empty, at most 255 bytes (R2.2).
    DeviceId
);
string_newtype!(
    /// A key algorithm, the part of a key ID before the colon: non-empty, no
    /// colon, at most 255 bytes (R2.3). Any name is allowed, not only
    /// `signed_curve25519`.
    Algorithm
);

impl UserId {
    /// Validates a user ID (R2.1, R2.8).
    ///
    /// # Errors
    /// [`Error::InvalidUserId`] when it does not start with `@`, has an empty
    /// localpart or server name, has no `:`, is longer than 255 bytes or
    /// contains U+0000.
    pub fn parse(value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        Self::check(&value)?;
        Ok(Self(value))
    }

    /// What [`UserId::parse`] checks, without keeping the ID.
    pub(crate) fn check(value: &str) -> Result<()> {
        if value.contains('\0') {
            return Err(Error::InvalidUserId {
                reason: "contains U+0000",
            });
        }
        let ok = value.len() <= MAX_ID_BYTES
            && value
                .strip_prefix('@')
                .and_then(|rest| rest.split_once(':'))
                .is_some_and(|(local, server)| !local.is_empty() && !server.is_empty());
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidUserId {
                reason: if value.len() > MAX_ID_BYTES {
                    "longer than 255 bytes"
                } else {
                    "not of the form @localpart:server"
                },
            })
        }
    }
}

impl DeviceId {
    /// Validates a device ID (R2.2, R2.8).
    ///
    /// # Errors
    /// [`Error::InvalidDeviceId`] when it is empty, longer than 255 bytes or
    /// contains U+0000.
    pub fn parse(value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        Self::check(&value)?;
        Ok(Self(value))
    }

    /// What [`DeviceId::parse`] checks, without keeping the ID.
    pub(crate) fn check(value: &str) -> Result<()> {
        if value.is_empty() {
            Err(Error::InvalidDeviceId { reason: "empty" })
        } else if value.contains('\0') {
            Err(Error::InvalidDeviceId {
                reason: "contains U+0000",
            })
        } else if value.len() > MAX_ID_BYTES {
            Err(Error::InvalidDeviceId {
                reason: "longer than 255 bytes",
            })
        } else {
            Ok(())
        }
    }
}

impl Algorithm {
    /// Validates an algorithm name (R2.3, R2.8).
    ///
    /// # Errors
    /// [`Error::InvalidKeyId`] when it is empty, contains `:` or U+0000, or
    /// is longer than 255 bytes.
    pub fn parse(value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        if value.is_empty() || value.len() > MAX_ID_BYTES || value.contains([':', '\0']) {
            Err(Error::InvalidKeyId {
                reason: "algorithm must be 1 to 255 bytes without ':' or U+0000",
            })
        } else {
            Ok(Self(value))
        }
    }

    /// The `signed_curve25519` algorithm.
    pub fn signed_curve25519() -> Self {
        Self(SIGNED_CURVE25519.to_owned())
    }
}

/// A key ID, `<algorithm>:<name>` (R2.3).
///
/// Ordering is the byte order of the whole ID, which is also the tie-break
/// order of keys inside one upload (R3.5, R2.7).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId {
    full: String,
    colon: usize,
}

impl KeyId {
    /// Validates a key ID (R2.3, R2.8): exactly one `:`, a non-empty algorithm
    /// before it and a non-empty name after it, each at most 255 bytes, and
    /// no U+0000.
    ///
    /// # Errors
    /// [`Error::InvalidKeyId`] otherwise.
    pub fn parse(value: impl Into<String>) -> Result<Self> {
        let full = value.into();
        let mut colons = full.match_indices(':');
        let colon = match (colons.next(), colons.next()) {
            (Some((i, _)), None) => i,
            _ => {
                return Err(Error::InvalidKeyId {
                    reason: "a key ID has exactly one ':'",
                });
            }
        };
        let (alg, name) = (&full[..colon], &full[colon + 1..]);
        if full.contains('\0') {
            return Err(Error::InvalidKeyId {
                reason: "contains U+0000",
            });
        }
        if alg.is_empty() || name.is_empty() {
            return Err(Error::InvalidKeyId {
                reason: "empty algorithm or key name",
            });
        }
        if alg.len() > MAX_ID_BYTES || name.len() > MAX_ID_BYTES {
            return Err(Error::InvalidKeyId {
                reason: "algorithm or key name longer than 255 bytes",
            });
        }
        Ok(Self { full, colon })
    }

    /// The algorithm part, before the colon.
    pub fn algorithm_str(&self) -> &str {
        &self.full[..self.colon]
    }

    /// The algorithm part as a validated [`Algorithm`].
    pub fn algorithm(&self) -> Algorithm {
        Algorithm(self.algorithm_str().to_owned())
    }

    /// The name part, after the colon.
    pub fn name(&self) -> &str {
        &self.full[self.colon + 1..]
    }

    /// The whole key ID.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.full, f)
    }
}

impl std::str::FromStr for KeyId {
    type Err = Error;
    fn from_str(value: &str) -> Result<Self> {
        Self::parse(value)
    }
}

/// A device: the pair (user ID, device ID). All keys belong to exactly one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Device {
    /// The owning user.
    pub user_id: UserId,
    /// The device of that user.
    pub device_id: DeviceId,
}

impl Device {
    /// Builds a device from validated parts.
    pub fn new(user_id: UserId, device_id: DeviceId) -> Self {
        Self { user_id, device_id }
    }

    /// Validates and builds a device from strings (R2.1, R2.2).
    ///
    /// # Errors
    /// [`Error::InvalidUserId`] or [`Error::InvalidDeviceId`].
    pub fn parse(user_id: &str, device_id: &str) -> Result<Self> {
        Ok(Self::new(
            UserId::parse(user_id)?,
            DeviceId::parse(device_id)?,
        ))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user_id, self.device_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        assert!(UserId::parse("@a:b").is_ok());
        assert!(UserId::parse("@a:b:8448").is_ok());
        for bad in ["", "@", "@:b", "@a:", "a:b", "@ab"] {
            assert!(UserId::parse(bad).is_err(), "{bad}");
        }
        let long = format!("@{}:b", "a".repeat(252));
        assert_eq!(long.len(), 255);
        assert!(UserId::parse(long.clone()).is_ok());
        assert!(UserId::parse(format!("{long}x")).is_err());
    }

    /// R2.8: U+0000 is refused in every identifier, with the error kind of
    /// the identifier (user and device IDs `M_INVALID_PARAM`, key IDs and
    /// algorithms `M_BAD_JSON`).
    #[test]
    fn r2_8_no_identifier_holds_u0000() {
        assert!(matches!(
            UserId::parse("@a\0:b"),
            Err(Error::InvalidUserId { .. })
        ));
        assert!(matches!(
            DeviceId::parse("D\0"),
            Err(Error::InvalidDeviceId { .. })
        ));
        assert!(matches!(
            Algorithm::parse("alg\0"),
            Err(Error::InvalidKeyId { .. })
        ));
        for bad in ["a\0:b", "a:b\0", "\0:b"] {
            assert!(
                matches!(KeyId::parse(bad), Err(Error::InvalidKeyId { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn device_ids() {
        assert!(DeviceId::parse("D").is_ok());
        assert!(DeviceId::parse("").is_err());
        assert!(DeviceId::parse("x".repeat(255)).is_ok());
        assert!(DeviceId::parse("x".repeat(256)).is_err());
    }

    #[test]
    fn key_ids() {
        let k = KeyId::parse("signed_curve25519:AAAA").unwrap();
        assert_eq!(k.algorithm_str(), "signed_curve25519");
        assert_eq!(k.name(), "AAAA");
        for bad in ["", ":", "a:", ":b", "ab", "a:b:c"] {
            assert!(KeyId::parse(bad).is_err(), "{bad}");
        }
        assert!(KeyId::parse(format!("{}:x", "a".repeat(255))).is_ok());
        assert!(KeyId::parse(format!("{}:x", "a".repeat(256))).is_err());
        assert!(KeyId::parse(format!("a:{}", "x".repeat(256))).is_err());
    }

    #[test]
    fn algorithms() {
        assert!(Algorithm::parse("signed_curve25519").is_ok());
        assert!(Algorithm::parse("").is_err());
        assert!(Algorithm::parse("a:b").is_err());
    }
}
