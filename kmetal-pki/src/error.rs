//! Why a PKI operation failed; every variant names the file (kubeadm path) or field.

/// A parser's or library's error, kept as the source.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A PKI error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A SAN is neither an IP address nor a DNS name.
    #[error("{field}: {value:?} is neither an IP address nor a DNS name")]
    InvalidSan {
        /// Field (`certSANs[2]`, `endpoint`).
        field: String,
        /// The value.
        value: String,
    },
    /// An IP address does not parse.
    #[error("{field}: {value:?} is not an IP address")]
    InvalidIp {
        /// Field.
        field: String,
        /// The value.
        value: String,
    },
    /// A CIDR does not parse.
    #[error("{field}: {value:?} is not a CIDR")]
    InvalidCidr {
        /// Field.
        field: String,
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: kmetal_core::net::CidrError,
    },
    /// The algorithm needs a feature this build lacks.
    #[error("algorithm {algorithm} needs kmetal-pki's `{feature}` feature")]
    UnsupportedAlgorithm {
        /// The algorithm.
        algorithm: &'static str,
        /// The feature.
        feature: &'static str,
    },
    /// Generating or signing failed.
    #[error("cannot issue {file}")]
    Issue {
        /// The file being issued.
        file: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A file is missing from a bundle.
    #[error("{file}: missing")]
    Missing {
        /// The file.
        file: String,
    },
    /// A file cannot be read or written.
    #[error("{file}: cannot read or write")]
    Io {
        /// The file.
        file: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold a parsable certificate, key or kubeconfig.
    #[error("{file}: {what}")]
    Parse {
        /// The file (for a kubeconfig field, `admin.conf: users[0].user.client-key-data`).
        file: String,
        /// What is wrong (`not a PEM certificate`, `not base64`).
        what: &'static str,
        /// The parser's error, when it gave one.
        #[source]
        source: Option<Cause>,
    },
    /// A key could not be generated (aws-lc-rs for RSA, which gives no reason).
    #[error("{file}: {step}")]
    KeyGeneration {
        /// The key's file.
        file: String,
        /// The step that failed.
        step: &'static str,
    },
    /// A private key does not belong to its certificate.
    #[error("{file}: the private key does not match the certificate {cert}")]
    KeyMismatch {
        /// The key file (or kubeconfig).
        file: String,
        /// The certificate it should match.
        cert: String,
    },
    /// A certificate is not signed by the CA it should chain to.
    #[error("{file}: not signed by {ca}")]
    NotSignedBy {
        /// The certificate.
        file: String,
        /// The CA file.
        ca: String,
    },
    /// A certificate cannot be renewed.
    #[error("{name}: cannot be renewed: {reason}")]
    NotRenewable {
        /// The name asked for.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A rotation phase was asked for out of order.
    #[error("CA rotation: {reason}")]
    Rotation {
        /// Why.
        reason: &'static str,
    },
    /// A CA has expired (nothing it signs can be trusted).
    #[error("{file}: the CA expired at {not_after}")]
    ExpiredCa {
        /// The CA file.
        file: String,
        /// Its NotAfter (RFC 3339).
        not_after: String,
    },
}
