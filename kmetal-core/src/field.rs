//! Field errors: what is wrong with one field ([`Problem`]), where ([`FieldError`]), and all
//! of an object's problems ([`FieldErrors`]). A leaf module: decoding ([`crate::object`]) and
//! validation ([`crate::validate`]) both report through it, so imports run one way.

use std::fmt;

use crate::net::{CidrError, HostPortError};
use crate::version::VersionError;

/// What is wrong with one field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// The field must be set.
    #[error("required")]
    Required,
    /// The value has the wrong type (as found while decoding).
    #[error("{0}")]
    WrongType(serde_json::Error),
    /// A number outside its range.
    #[error("must be {min}..={max}")]
    OutOfRange {
        /// Smallest allowed.
        min: i64,
        /// Largest allowed.
        max: i64,
        /// What was given.
        found: i64,
    },
    /// A number below its minimum.
    #[error("must be at least {min} (found {found})")]
    TooSmall {
        /// Smallest allowed.
        min: i64,
        /// What was given.
        found: i64,
    },
    /// A value not in the allowed set.
    #[error("must be one of {} (found {found:?})", allowed.join(", "))]
    NotOneOf {
        /// Allowed spellings.
        allowed: &'static [&'static str],
        /// What was given.
        found: String,
    },
    /// Not an IP address.
    #[error("must be an IP address (found {found:?})")]
    InvalidIp {
        /// What was given.
        found: String,
    },
    /// Neither an IP address nor a DNS name.
    #[error("must be an IP address or DNS name (found {found:?})")]
    InvalidAddress {
        /// What was given.
        found: String,
    },
    /// Not a CIDR.
    #[error("invalid CIDR {found:?}: {reason}")]
    InvalidCidr {
        /// What was given.
        found: String,
        /// Why.
        reason: CidrError,
    },
    /// Not a `host:port` endpoint.
    #[error("invalid endpoint {found:?}: {reason}")]
    InvalidEndpoint {
        /// What was given.
        found: String,
        /// Why.
        reason: HostPortError,
    },
    /// Not a Kubernetes version.
    #[error("invalid version {found:?}: {reason}")]
    InvalidVersion {
        /// What was given.
        found: String,
        /// Why.
        reason: VersionError,
    },
    /// Not an RFC 1123 name.
    #[error("must be a lowercase RFC 1123 {what} (found {found:?})")]
    InvalidName {
        /// "label" or "subdomain".
        what: &'static str,
        /// What was given.
        found: String,
    },
    /// Not usable as an etcd prefix / SQL identifier.
    #[error("must be 1..=63 characters of [A-Za-z0-9_] (found {found:?})")]
    InvalidIdentifier {
        /// What was given.
        found: String,
    },
    /// Not base64.
    #[error("content must be base64")]
    InvalidBase64(#[source] base64::DecodeError),
    /// Of a group of fields, exactly one must be set.
    #[error("exactly one of {} must be set", fields.join(", "))]
    ExactlyOneOf {
        /// The fields of the group.
        fields: &'static [&'static str],
    },
    /// One of several fields must be set.
    #[error("{why}: one of {} must be set", fields.join(", "))]
    OneOfRequired {
        /// The candidate fields.
        fields: &'static [&'static str],
        /// Which rule asks for it.
        why: &'static str,
    },
    /// Set together with a field it excludes.
    #[error("cannot be set together with {other}")]
    ConflictsWith {
        /// The path of the other field.
        other: &'static str,
    },
    /// Must be zero because of another field's value.
    #[error("must be 0 when {because}")]
    MustBeZero {
        /// The other field's setting.
        because: &'static str,
    },
    /// Two CIDRs overlap.
    #[error("overlaps {other} ({found})")]
    CidrOverlap {
        /// The path of the other CIDR.
        other: &'static str,
        /// This CIDR.
        found: String,
    },
    /// An IP outside the CIDR it belongs to.
    #[error("{found} is outside {cidr}")]
    OutsideCidr {
        /// What was given.
        found: String,
        /// The CIDR it must be in.
        cidr: String,
    },
    /// A value listed twice.
    #[error("duplicate value {found:?}")]
    Duplicate {
        /// The repeated value.
        found: String,
    },
    /// Changed although immutable.
    #[error("field is immutable (was {old:?}, now {new:?})")]
    Immutable {
        /// Stored value.
        old: String,
        /// Requested value.
        new: String,
    },
    /// A Kubernetes version downgrade.
    #[error("cannot downgrade from {from} to {to}")]
    Downgrade {
        /// Stored version.
        from: String,
        /// Requested version.
        to: String,
    },
    /// More than one minor version at once.
    #[error("cannot upgrade from {from} to {to}: one minor version at a time")]
    VersionSkip {
        /// Stored version.
        from: String,
        /// Requested version.
        to: String,
    },
    /// A rule specific to the driver.
    #[error("{0}")]
    DriverRule(&'static str),
}

/// One problem and where it is.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct FieldError {
    /// Field path, e.g. `spec.networkProfile.port`.
    pub path: String,
    /// What is wrong (shown in the message, so not also a source).
    pub problem: Problem,
}

impl FieldError {
    /// A problem at a path.
    pub fn new(path: impl Into<String>, problem: Problem) -> Self {
        Self {
            path: path.into(),
            problem,
        }
    }
}

/// All problems of one object, in discovery order.
#[derive(Debug, thiserror::Error)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
