//! TLS to the server (libpq's `sslmode` and `sslrootcert`), against
//! throwaway clusters on 127.0.0.1: one with a certificate for `localhost`
//! signed by a CA made here, accepting TLS connections only (`hostssl`),
//! and one without TLS.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use keyclaim::{ClaimTarget, Error, KeyStore};
use keyclaim_conformance::fixtures::{alg, dev, otks, put};
use keyclaim_postgres::{PostgresOptions, PostgresStore, RootCertificates, SslMode};
use keyclaim_testing::postgres::{Cluster, ClusterConfig, free_port, unique_schema};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn make_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        cert,
        key,
    }
}

/// The clusters and the CA of the TLS one, started once per process.
struct Servers {
    ca: Ca,
    other_ca: Ca,
    tls: Cluster,
    plain: Cluster,
    /// A directory holding the CA's PEM as `ca.pem`.
    dir: tempfile::TempDir,
}

fn start() -> Result<Servers, String> {
    let ca = make_ca("keyclaim test CA");
    let other_ca = make_ca("another CA");
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca.cert, &ca.key)
        .unwrap();
    let port = |what| free_port().map_err(|e| format!("no free port for {what}: {e}"));
    let tls = Cluster::start_configured(
        false,
        &ClusterConfig {
            tcp_port: Some(port("the TLS cluster")?),
            conf: vec![
                "ssl = on".into(),
                "ssl_cert_file = 'server.crt'".into(),
                "ssl_key_file = 'server.key'".into(),
            ],
            files: vec![
                ("server.crt".into(), server_cert.pem().into_bytes()),
                ("server.key".into(), server_key.serialize_pem().into_bytes()),
                (
                    "pg_hba.conf".into(),
                    b"local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
                      hostssl all all ::1/128 trust\n"
                        .to_vec(),
                ),
            ],
        },
    )
    .map_err(|e| format!("cannot start a TLS cluster: {e}"))?;
    let plain = Cluster::start_configured(
        false,
        &ClusterConfig {
            tcp_port: Some(port("the plain cluster")?),
            ..ClusterConfig::default()
        },
    )
    .map_err(|e| format!("cannot start a cluster: {e}"))?;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    Ok(Servers {
        ca,
        other_ca,
        tls,
        plain,
        dir,
    })
}

/// The servers, or `None` after a loud skip (a failure under `CI=true`).
fn servers(what: &str) -> Option<&'static Servers> {
    static SERVERS: OnceLock<Result<Servers, String>> = OnceLock::new();
    keyclaim_testing::require(what, SERVERS.get_or_init(start).as_ref())
}

fn options() -> PostgresOptions {
    PostgresOptions::new()
        .schema(unique_schema("kc_tls"))
        .pool_size(2)
        .allow_unsafe_server(true)
}

fn run<F: Future<Output = ()>>(test: F) {
    keyclaim_testing::runtime(2).block_on(test);
}

/// The error and its sources, for messages.
fn chain(error: &Error) -> String {
    let mut out = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        out.push_str(": ");
        out.push_str(&inner.to_string());
        source = inner.source();
    }
    out
}

fn refused(result: keyclaim::Result<PostgresStore>, cause: &str) -> String {
    match result {
        Err(e @ Error::InvalidConfig { .. }) => {
            let message = chain(&e);
            assert!(message.contains(cause), "{message}");
            assert!(!e.is_retryable());
            message
        }
        Err(e) => panic!("expected InvalidConfig, got {}", chain(&e)),
        Ok(store) => panic!("connected: {store:?}"),
    }
}

/// A store connects to `url` with `options`, and works.
async fn connects_and_claims(url: &str, options: PostgresOptions) -> PostgresStore {
    let store = PostgresStore::connect_with(url, options).await.unwrap();
    upload_and_claim(&store).await;
    store
}

/// A store works: an upload and a claim of its key.
async fn upload_and_claim(store: &PostgresStore) {
    let device = dev("@alice:example.org", "TLSDEV");
    put(store, &device, otks("signed_curve25519", &["K1"]), vec![]).await;
    let outcome = store
        .claim(&[ClaimTarget::one(device, alg("signed_curve25519"))])
        .await
        .unwrap();
    assert_eq!(outcome.keys.len(), 1, "{outcome:?}");
}

#[test]
fn verify_full_to_the_certificates_host_name_connects_and_claims() {
    let Some(s) = servers("TLS verify-full") else {
        return;
    };
    run(async {
        // Options form.
        connects_and_claims(
            &s.tls.tcp_url("localhost"),
            options()
                .ssl_mode(SslMode::VerifyFull)
                .root_certificates(RootCertificates::Pem(s.ca.pem.clone())),
        )
        .await;
        // The URL form, with the CA in a file (the server accepts TLS
        // connections only: the pool's and the listener's both use it).
        let url = format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            s.tls.tcp_url("localhost"),
            s.dir.path().join("ca.pem").display()
        );
        let store = connects_and_claims(&url, options()).await;
        // Debug shows no key material.
        let debug = format!(
            "{store:?} {:?}",
            options().root_certificates(RootCertificates::Pem(s.ca.pem.clone()))
        );
        assert!(!debug.contains("BEGIN"), "{debug}");
    });
}

#[test]
fn verify_full_refuses_a_host_name_the_certificate_does_not_carry() {
    let Some(s) = servers("TLS verify-full, wrong name") else {
        return;
    };
    run(async {
        let result = PostgresStore::connect_with(
            &s.tls.tcp_url("127.0.0.1"),
            options()
                .ssl_mode(SslMode::VerifyFull)
                .root_certificates(RootCertificates::Pem(s.ca.pem.clone())),
        )
        .await;
        refused(result, "not valid for name");
    });
}

#[test]
fn verify_ca_checks_the_chain_but_not_the_name() {
    let Some(s) = servers("TLS verify-ca") else {
        return;
    };
    run(async {
        // key=value form, to an address the certificate does not name.
        let conninfo = format!(
            "{} sslmode=verify-ca sslrootcert='{}'",
            tcp_pairs(s, "127.0.0.1"),
            s.dir.path().join("ca.pem").display()
        );
        connects_and_claims(&conninfo, options()).await;
        // Another CA: refused.
        let result = PostgresStore::connect_with(
            &s.tls.tcp_url("localhost"),
            options()
                .ssl_mode(SslMode::VerifyCa)
                .root_certificates(RootCertificates::Pem(s.other_ca.pem.clone())),
        )
        .await;
        refused(result, "TLS handshake");
        // `require` with roots checks the chain as verify-ca does.
        let result = PostgresStore::connect_with(
            &format!("{}?sslmode=require", s.tls.tcp_url("127.0.0.1")),
            options().root_certificates(RootCertificates::Pem(s.other_ca.pem.clone())),
        )
        .await;
        refused(result, "TLS handshake");
    });
}

/// `host=... port=... user=... dbname=...` of the TLS cluster over TCP.
fn tcp_pairs(s: &Servers, host: &str) -> String {
    let url = s.tls.tcp_url(host);
    let port = url.rsplit(':').next().unwrap().split('/').next().unwrap();
    format!("host={host} port={port} user=postgres dbname=postgres")
}

#[test]
fn require_without_roots_encrypts_without_checking() {
    let Some(s) = servers("TLS require") else {
        return;
    };
    run(async {
        connects_and_claims(
            &format!("{}?sslmode=require", s.tls.tcp_url("127.0.0.1")),
            options(),
        )
        .await;
        // `prefer` (the default) uses TLS where the server offers it: this
        // server takes nothing else.
        connects_and_claims(&s.tls.tcp_url("127.0.0.1"), options()).await;
    });
}

#[test]
fn disable_fails_clearly_where_the_server_requires_tls() {
    let Some(s) = servers("TLS disable") else {
        return;
    };
    run(async {
        let result = PostgresStore::connect_with(
            &format!("{}?sslmode=disable", s.tls.tcp_url("localhost")),
            options(),
        )
        .await;
        match result {
            Err(e) => {
                let message = chain(&e);
                assert!(message.contains("no encryption"), "{message}");
                assert!(!e.is_retryable(), "{message}");
            }
            Ok(store) => panic!("connected in plain: {store:?}"),
        }
    });
}

#[test]
fn prefer_connects_in_plain_to_a_server_without_tls_and_require_does_not() {
    let Some(s) = servers("TLS prefer") else {
        return;
    };
    run(async {
        connects_and_claims(
            &format!("{}?sslmode=prefer", s.plain.tcp_url("127.0.0.1")),
            options(),
        )
        .await;
        let result = PostgresStore::connect_with(
            &s.plain.tcp_url("127.0.0.1"),
            options().ssl_mode(SslMode::Require),
        )
        .await;
        refused(result, "does not offer TLS");
    });
}

#[test]
fn bad_tls_settings_are_configuration_errors() {
    // No server needed: refused before connecting.
    run(async {
        let result = PostgresStore::connect_with(
            "postgresql://localhost:1/db?sslmode=verify-full",
            options(),
        )
        .await;
        refused(result, "needs root certificates");
        let result = PostgresStore::connect_with(
            "host=localhost port=1 sslmode=verify-ca sslrootcert=/nonexistent/ca.pem",
            options(),
        )
        .await;
        refused(result, "/nonexistent/ca.pem");
        let result =
            PostgresStore::connect_with("postgresql://localhost:1/db?sslmode=allow", options())
                .await;
        refused(result, "invalid sslmode");
    });
}
