//! TLS to the server, with rustls (pure Rust, the ring provider): libpq's
//! `sslmode` and `sslrootcert`, from the connection string or from
//! [`PostgresOptions`](crate::PostgresOptions).
//!
//! tokio-postgres itself knows only `sslmode=disable|prefer|require` and no
//! `sslrootcert`, so [`split`] takes both out of the connection string
//! before tokio-postgres parses the rest, and [`Tls::connector`] builds the
//! certificate check the mode asks for:
//!
//! | `sslmode` | encrypted | certificate checked |
//! | --- | --- | --- |
//! | `disable` | never | no |
//! | `prefer` (default) | when the server offers TLS, else plain | no |
//! | `require` | always | no; with root certificates given, as `verify-ca` (as libpq) |
//! | `verify-ca` | always | chained to the root certificates |
//! | `verify-full` | always | chained to the roots and naming the host connected to |
//!
//! A refused certificate, a server without TLS under `require` or
//! stronger, and unreadable root certificates are
//! [`Error::InvalidConfig`]: trying again does not help (see
//! [`crate::error`]).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use keyclaim::{Error, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// The TLS connector every connection of a store uses (the pool's and the
/// listener's).
pub(crate) type Connector = tokio_postgres_rustls::MakeRustlsConnect;

/// Whether and how a connection uses TLS: libpq's `sslmode` (see the
/// [module docs](crate#tls)). Set it in the connection string
/// (`sslmode=verify-full`) or with [`PostgresOptions::ssl_mode`].
///
/// [`PostgresOptions::ssl_mode`]: crate::PostgresOptions::ssl_mode
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SslMode {
    /// Plain connections only.
    Disable,
    /// TLS when the server offers it (certificate not checked), else
    /// plain. The default, as in libpq.
    Prefer,
    /// TLS always; the certificate is not checked unless root
    /// certificates are given, then it is checked as [`SslMode::VerifyCa`].
    Require,
    /// TLS always, with a certificate that chains to the root
    /// certificates; the host name is not checked.
    VerifyCa,
    /// TLS always, with a certificate that chains to the root
    /// certificates and names the host connected to.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's name of a mode (`disable`, `prefer`, `require`,
    /// `verify-ca`, `verify-full`). libpq's `allow` is refused.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for any other value.
    pub fn parse(value: &str) -> Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(Error::invalid_config(format!(
                    "invalid sslmode {value:?}: use disable, prefer, require, verify-ca \
                     or verify-full"
                )));
            }
        })
    }

    /// libpq's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The certificates a server's certificate must chain to: libpq's
/// `sslrootcert`. Set it in the connection string (`sslrootcert=PATH` or
/// `sslrootcert=system`) or with [`PostgresOptions::root_certificates`].
///
/// [`PostgresOptions::root_certificates`]: crate::PostgresOptions::root_certificates
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RootCertificates {
    /// A PEM file of one or more certificates, read at connect.
    File(PathBuf),
    /// PEM text of one or more certificates.
    Pem(String),
    /// The operating system's trusted certificates (libpq's
    /// `sslrootcert=system`): the mode must be
    /// [`SslMode::VerifyFull`], which it then defaults to.
    System,
}

impl fmt::Debug for RootCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCertificates::File(path) => f.debug_tuple("File").field(path).finish(),
            // Public certificates, but long: their size is enough in a log.
            RootCertificates::Pem(pem) => write!(f, "Pem({} bytes)", pem.len()),
            RootCertificates::System => f.write_str("System"),
        }
    }
}

/// The TLS settings of a store, resolved from the connection string and
/// the options.
#[derive(Clone, Debug)]
pub(crate) struct Tls {
    pub(crate) mode: SslMode,
    roots: Option<RootCertificates>,
}

impl Tls {
    /// The mode and roots: an option set in [`crate::PostgresOptions`] wins
    /// over the connection string's. `sslrootcert=system` defaults the
    /// mode to `verify-full` and allows nothing weaker (as libpq);
    /// `verify-ca` and `verify-full` need root certificates.
    pub(crate) fn resolve(
        option_mode: Option<SslMode>,
        option_roots: Option<&RootCertificates>,
        from_string: Split,
    ) -> Result<Tls> {
        let roots = option_roots.cloned().or(from_string.roots);
        let system = roots == Some(RootCertificates::System);
        let mode = option_mode.or(from_string.mode).unwrap_or(if system {
            SslMode::VerifyFull
        } else {
            SslMode::Prefer
        });
        if system && mode != SslMode::VerifyFull {
            return Err(Error::invalid_config(format!(
                "sslrootcert=system needs sslmode=verify-full, not {}",
                mode.as_str()
            )));
        }
        if roots.is_none() && matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(Error::invalid_config(format!(
                "sslmode={} needs root certificates: set sslrootcert=PATH (a PEM file) or \
                 sslrootcert=system, or PostgresOptions::root_certificates",
                mode.as_str()
            )));
        }
        Ok(Tls { mode, roots })
    }

    /// tokio-postgres's mode: whether TLS is tried, and whether it must
    /// succeed.
    pub(crate) fn pg_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self.mode {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }

    /// The connector with the certificate check of the mode (see the
    /// module docs).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the root certificates cannot be read
    /// or hold none.
    pub(crate) fn connector(&self) -> Result<Connector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let lenient = |chain| -> Arc<dyn ServerCertVerifier> {
            Arc::new(Lenient {
                chain,
                provider: provider.clone(),
            })
        };
        let verifier = match (self.mode, &self.roots) {
            (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => lenient(None),
            (SslMode::Require | SslMode::VerifyCa, Some(roots)) => {
                lenient(Some(webpki_verifier(roots, provider.clone())?))
            }
            (SslMode::VerifyFull, Some(roots)) => webpki_verifier(roots, provider.clone())?,
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(Error::invalid_config("no root certificates"));
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::invalid_config(format!("TLS setup failed: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Connector::new(config))
    }
}

/// Checks chain and host name against `roots`.
fn webpki_verifier(
    roots: &RootCertificates,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>> {
    let mut store = RootCertStore::empty();
    let (certs, source) = match roots {
        RootCertificates::File(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                Error::invalid_config(format!(
                    "cannot read the root certificates {}: {e}",
                    path.display()
                ))
            })?;
            (pem_certificates(&pem), format!("{}", path.display()))
        }
        RootCertificates::Pem(pem) => (pem_certificates(pem.as_bytes()), "the PEM given".into()),
        RootCertificates::System => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(%error, "could not load a system root certificate");
            }
            (Ok(found.certs), "the system's trusted certificates".into())
        }
    };
    let certs = certs.map_err(|e| {
        Error::invalid_config(format!("invalid root certificates in {source}: {e}"))
    })?;
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(Error::invalid_config(format!(
            "no usable root certificate in {source}"
        )));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .map_err(|e| Error::invalid_config(format!("invalid root certificates in {source}: {e}")))
}

fn pem_certificates(
    pem: &[u8],
) -> std::result::Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem).collect()
}

/// The certificate check of `prefer`, `require` and `verify-ca`: none
/// (`chain` unset), or the chain without the host name. Either way the
/// handshake's signatures are checked, so the server holds the key of the
/// certificate it shows.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // The name is checked last, after the chain: a name mismatch
        // means the chain was good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What [`split`] took out of a connection string.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Split {
    pub(crate) mode: Option<SslMode>,
    pub(crate) roots: Option<RootCertificates>,
}

/// The parameters [`split`] takes out.
const TLS_KEYS: [&str; 2] = ["sslmode", "sslrootcert"];

/// Takes `sslmode` and `sslrootcert` out of a connection string, as a URL
/// or as `key=value` pairs, and answers the rest (for tokio-postgres) and
/// what they said. A string that does not scan is returned whole, for
/// tokio-postgres to report.
///
/// # Errors
/// [`Error::InvalidConfig`] for an invalid `sslmode`, or either key given
/// twice.
pub(crate) fn split(connection: &str) -> Result<(String, Split)> {
    let scanned =
        if connection.starts_with("postgres://") || connection.starts_with("postgresql://") {
            scan_url(connection)
        } else {
            scan_pairs(connection)
        };
    let Some(params) = scanned else {
        return Ok((connection.to_owned(), Split::default()));
    };
    let mut split = Split::default();
    let mut rest = String::with_capacity(connection.len());
    let mut from = 0;
    for param in params
        .into_iter()
        .filter(|p| TLS_KEYS.contains(&p.key.as_str()))
    {
        rest.push_str(&connection[from..param.span.0]);
        from = param.span.1;
        let invalid = |reason: String| {
            Error::invalid_config(format!("invalid PostgreSQL connection string: {reason}"))
        };
        let twice = || invalid(format!("{} given twice", param.key));
        if param.key == "sslmode" {
            if split.mode.is_some() {
                return Err(twice());
            }
            let mode = SslMode::parse(&param.value).map_err(|e| match e {
                Error::InvalidConfig { reason } => invalid(reason),
                other => other,
            })?;
            split.mode = Some(mode);
        } else {
            if split.roots.is_some() {
                return Err(twice());
            }
            split.roots = Some(if param.value == "system" {
                RootCertificates::System
            } else {
                RootCertificates::File(PathBuf::from(param.value))
            });
        }
    }
    rest.push_str(&connection[from..]);
    Ok((tidy(rest, connection), split))
}

/// The string left once parameters are cut out: no `&&`, no trailing `&`
/// or `?` in a URL; single spaces between pairs otherwise.
fn tidy(rest: String, original: &str) -> String {
    if original.starts_with("postgres") && original.contains("://") {
        let Some(q) = query_start(&rest) else {
            return rest;
        };
        let kept: Vec<&str> = rest[q + 1..].split('&').filter(|p| !p.is_empty()).collect();
        let mut out = rest[..q].to_owned();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
        out
    } else {
        rest.trim().to_owned()
    }
}

/// One `key=value` parameter of a connection string: its byte span (to cut
/// it out), its key and its (unquoted, unescaped or percent-decoded) value.
#[derive(Debug)]
struct Param {
    span: (usize, usize),
    key: String,
    value: String,
}

/// The byte offset of a URL's `?`: the first after the user information,
/// as tokio-postgres reads it.
fn query_start(url: &str) -> Option<usize> {
    let scheme_end = url.find("://")? + 3;
    let after_user = url[scheme_end..]
        .find('@')
        .map_or(scheme_end, |at| scheme_end + at + 1);
    url[after_user..].find('?').map(|q| after_user + q)
}

/// The query parameters of a URL, each with its span including one `&`
/// next to it.
fn scan_url(url: &str) -> Option<Vec<Param>> {
    let Some(q) = query_start(url) else {
        return Some(Vec::new());
    };
    let mut params = Vec::new();
    let mut start = q + 1;
    for part in url[q + 1..].split('&') {
        let end = start + part.len();
        if let Some((key, value)) = part.split_once('=') {
            params.push(Param {
                span: (start, (end + 1).min(url.len())),
                key: key.to_owned(),
                value: percent_decode(value)?,
            });
        }
        start = end + 1;
    }
    Some(params)
}

/// `%XX` escapes decoded (as tokio-postgres decodes URL values); `None`
/// when the result is not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(Some(h)), Some(Some(l))) = (
                bytes.get(i + 1).map(|&b| hex(b)),
                bytes.get(i + 2).map(|&b| hex(b)),
            )
        {
            out.push(u8::try_from(h * 16 + l).ok()?);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The pairs of a libpq `key=value` string (`key = 'quoted \' value'`,
/// backslash escapes), each with its span; `None` when it does not scan.
fn scan_pairs(s: &str) -> Option<Vec<Param>> {
    let b = s.as_bytes();
    let mut params = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i >= b.len() {
            return Some(params);
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_owned();
        i = skip_space(i);
        if b.get(i) != Some(&b'=') {
            return None;
        }
        i = skip_space(i + 1);
        let mut value = Vec::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i)? {
                    b'\'' => {
                        i += 1;
                        break;
                    }
                    b'\\' => {
                        value.push(*b.get(i + 1)?);
                        i += 2;
                    }
                    &c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' {
                    value.push(*b.get(i + 1)?);
                    i += 2;
                } else {
                    value.push(b[i]);
                    i += 1;
                }
            }
        }
        params.push(Param {
            span: (start, i),
            key,
            value: String::from_utf8(value).ok()?,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_ok(s: &str) -> (String, Split) {
        split(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn urls_lose_the_tls_parameters_and_keep_the_rest() {
        let (rest, got) = split_ok(
            "postgresql://u:p%3F@h:5433/db?application_name=hs&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca%20x.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgresql://u:p%3F@h:5433/db?application_name=hs&connect_timeout=3"
        );
        assert_eq!(got.mode, Some(SslMode::VerifyFull));
        assert_eq!(
            got.roots,
            Some(RootCertificates::File(PathBuf::from("/etc/ca x.pem")))
        );
        let (rest, got) = split_ok("postgres://h/db?sslmode=require");
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(got.mode, Some(SslMode::Require));
        let (rest, got) = split_ok("postgres://h/db?sslrootcert=system&sslmode=verify-ca");
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(got.roots, Some(RootCertificates::System));
        // A `?` in the password does not start the query.
        let (rest, got) = split_ok("postgres://u:a?sslmode=disable@h/db");
        assert_eq!(rest, "postgres://u:a?sslmode=disable@h/db");
        assert_eq!(got, Split::default());
        let (rest, _) = split_ok("postgres://h/db");
        assert_eq!(rest, "postgres://h/db");
    }

    #[test]
    fn pairs_lose_the_tls_parameters_and_keep_the_rest() {
        let (rest, got) = split_ok(
            r"host=db.internal sslmode = verify-ca  sslrootcert='/a b/c\'s.pem' dbname=synapse",
        );
        assert_eq!(
            rest.split_whitespace().collect::<Vec<_>>(),
            ["host=db.internal", "dbname=synapse"]
        );
        let parsed: tokio_postgres::Config = rest.parse().expect("tokio-postgres parses it");
        assert_eq!(parsed.get_dbname(), Some("synapse"));
        assert_eq!(got.mode, Some(SslMode::VerifyCa));
        assert_eq!(
            got.roots,
            Some(RootCertificates::File(PathBuf::from("/a b/c's.pem")))
        );
        let (rest, got) = split_ok("host=/run/postgresql dbname=x");
        assert_eq!(rest, "host=/run/postgresql dbname=x");
        assert_eq!(got, Split::default());
    }

    #[test]
    fn bad_and_repeated_values_are_refused() {
        for s in [
            "postgres://h/d?sslmode=allow",
            "postgres://h/d?sslmode=verify_full",
            "sslmode=on host=h",
            "postgres://h/d?sslmode=require&sslmode=disable",
            "sslrootcert=a sslrootcert=b",
        ] {
            assert!(matches!(split(s), Err(Error::InvalidConfig { .. })), "{s}");
        }
    }

    #[test]
    fn modes_and_roots_resolve_as_libpq() {
        let file = || RootCertificates::File(PathBuf::from("/ca.pem"));
        let from = |mode, roots| Split { mode, roots };
        // Default: prefer.
        let tls = Tls::resolve(None, None, Split::default()).unwrap();
        assert_eq!(tls.mode, SslMode::Prefer);
        // Options win over the string.
        let tls = Tls::resolve(
            Some(SslMode::Disable),
            None,
            from(Some(SslMode::Require), None),
        )
        .unwrap();
        assert_eq!(tls.mode, SslMode::Disable);
        // system: verify-full by default, nothing weaker.
        let tls = Tls::resolve(None, None, from(None, Some(RootCertificates::System))).unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert!(
            Tls::resolve(
                Some(SslMode::Require),
                Some(&RootCertificates::System),
                Split::default()
            )
            .is_err()
        );
        // Verifying needs roots.
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            assert!(Tls::resolve(Some(mode), None, Split::default()).is_err());
            assert!(Tls::resolve(Some(mode), Some(&file()), Split::default()).is_ok());
        }
        // A missing file is a configuration error at connect.
        let tls = Tls::resolve(Some(SslMode::VerifyFull), Some(&file()), Split::default()).unwrap();
        let err = tls.connector().err().expect("no such file");
        assert!(err.to_string().contains("/ca.pem"), "{err}");
        let pem = RootCertificates::Pem("not a certificate".into());
        assert!(format!("{pem:?}").contains("bytes"));
        assert!(
            Tls::resolve(Some(SslMode::VerifyCa), Some(&pem), Split::default())
                .unwrap()
                .connector()
                .is_err()
        );
    }
}
