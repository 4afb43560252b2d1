//! Client configurations against a rustls server, handshaking in memory.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConnection, ServerConfig};

use super::*;
use crate::testing::{TestPki, handshake};

fn settings(verification: Verification, roots: Roots) -> ClientSettings {
    ClientSettings {
        verification,
        roots,
        identity: None,
    }
}

fn ca(pki: &TestPki) -> Roots {
    Roots::File(pki.ca_file().to_owned())
}

fn server(identity: &Identity) -> ServerConfig {
    server_config(identity).expect("server config")
}

struct Fixture {
    _dir: tempfile::TempDir,
    pki: TestPki,
    other: TestPki,
    localhost: Identity,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path(), "ours");
    let other = TestPki::new(dir.path(), "theirs");
    let localhost = pki.server("localhost", &["localhost", "127.0.0.1"]);
    Fixture {
        _dir: dir,
        pki,
        other,
        localhost,
    }
}

fn refused_certificate(result: Result<ClientConnection, rustls::Error>) -> CertificateError {
    match result {
        Err(rustls::Error::InvalidCertificate(cause)) => cause,
        Err(other) => panic!("expected a refused certificate, got {other}"),
        Ok(_) => panic!("expected a refused certificate, the handshake succeeded"),
    }
}

#[test]
fn full_verification_accepts_the_right_ca_and_name_or_ip_address() {
    let f = fixture();
    for name in ["localhost", "127.0.0.1"] {
        let client = client_config(&settings(Verification::Full, ca(&f.pki))).unwrap();
        handshake(client, server(&f.localhost), name).expect(name);
    }
}

#[test]
fn full_verification_refuses_another_name() {
    let f = fixture();
    let client = client_config(&settings(Verification::Full, ca(&f.pki))).unwrap();
    let cause = refused_certificate(handshake(client, server(&f.localhost), "db.example.com"));
    assert!(
        matches!(
            cause,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        ),
        "{cause:?}"
    );
}

#[test]
fn chain_verification_ignores_the_name_but_not_the_issuer() {
    let f = fixture();
    let client = client_config(&settings(Verification::Chain, ca(&f.pki))).unwrap();
    handshake(client, server(&f.localhost), "db.example.com").expect("any name");

    let client = client_config(&settings(Verification::Chain, ca(&f.other))).unwrap();
    let cause = refused_certificate(handshake(client, server(&f.localhost), "localhost"));
    assert_eq!(cause, CertificateError::UnknownIssuer);
}

#[test]
fn full_verification_refuses_another_ca_and_mozilla_roots_refuse_a_private_ca() {
    let f = fixture();
    for roots in [ca(&f.other), Roots::Mozilla] {
        let client = client_config(&settings(Verification::Full, roots.clone())).unwrap();
        let cause = refused_certificate(handshake(client, server(&f.localhost), "localhost"));
        assert_eq!(cause, CertificateError::UnknownIssuer, "{roots:?}");
    }
}

#[test]
fn no_verification_accepts_any_certificate_and_never_reads_the_roots() {
    let f = fixture();
    let missing = Roots::File(f._dir.path().join("missing.pem"));
    let client = client_config(&settings(Verification::Nothing, missing)).unwrap();
    handshake(client, server(&f.localhost), "anything.example").expect("encrypted");
}

#[test]
fn mozilla_roots_are_compiled_in() {
    assert!(root_store(&Roots::Mozilla).unwrap().len() > 100);
}

#[test]
fn a_client_certificate_is_presented_to_a_server_that_asks() {
    let f = fixture();
    let identity = f.pki.client("client", "postgres");
    let mut roots = RootCertStore::empty();
    for cert in read_certificates("CA file", f.pki.ca_file()).unwrap() {
        roots.add(cert).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .unwrap();
    let server_config = || {
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(Arc::clone(&verifier))
            .with_single_cert(
                read_certificates("certificate file", &f.localhost.cert_file).unwrap(),
                read_private_key("key file", &f.localhost.key_file).unwrap(),
            )
            .unwrap()
    };

    let with_identity = ClientSettings {
        identity: Some(identity),
        ..settings(Verification::Full, ca(&f.pki))
    };
    handshake(
        client_config(&with_identity).unwrap(),
        server_config(),
        "localhost",
    )
    .expect("mutual TLS");

    let without = client_config(&settings(Verification::Full, ca(&f.pki))).unwrap();
    let err = handshake(without, server_config(), "localhost").expect_err("no client cert");
    assert!(
        matches!(
            err,
            rustls::Error::AlertReceived(_) | rustls::Error::NoCertificatesPresented
        ),
        "{err:?}"
    );
}

fn error_text(result: Result<impl std::fmt::Debug, TlsError>) -> String {
    let err = result.expect_err("an error");
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[test]
fn unusable_files_are_named_with_their_fault() {
    let f = fixture();
    let dir = f._dir.path();
    let missing = dir.join("missing.pem");
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "no PEM in here\n").unwrap();

    let text = error_text(root_store(&Roots::File(missing.clone())));
    assert!(text.starts_with("cannot read the CA file "), "{text}");
    assert!(text.contains(&*missing.to_string_lossy()), "{text}");
    assert!(text.contains("No such file"), "{text}");

    let text = error_text(root_store(&Roots::File(empty.clone())));
    assert_eq!(
        text,
        format!("the CA file {} holds no PEM certificate", empty.display())
    );

    // A certificate where the key should be.
    let text = error_text(read_private_key("key file", &f.localhost.cert_file));
    assert!(text.contains("holds no PEM private key"), "{text}");

    // A key that is not the certificate's.
    let other = f.pki.server("other", &["localhost"]);
    let mismatched = Identity {
        cert_file: f.localhost.cert_file.clone(),
        key_file: other.key_file.clone(),
    };
    let text = error_text(server_config(&mismatched));
    assert!(text.contains("cannot be used"), "{text}");
    assert_path_named(&text, &mismatched.key_file);
}

fn assert_path_named(text: &str, path: &Path) {
    assert!(text.contains(&*path.to_string_lossy()), "{text}");
}

#[test]
fn permanent_tls_errors_are_told_from_io_errors() {
    let refused = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
    assert!(is_permanent(&refused));
    let wrapped = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
    assert!(is_permanent(&wrapped));
    // Wrapped twice, as hyper's connector does.
    let twice = std::io::Error::other(wrapped);
    assert!(is_permanent(&twice));
    let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    assert!(!is_permanent(&reset));
    assert!(!is_permanent(&std::io::Error::other(reset)));
}

/// What a client that trusts `pki` sees as the server's certificate at a new handshake.
fn certificate_seen(pki: &TestPki, server: &Arc<ServerCertificate>) -> Vec<u8> {
    let client = client_config(&settings(Verification::Full, ca(pki))).unwrap();
    let config = server.server_config(&HTTP_ALPN).unwrap();
    let connection = handshake(client, config, "localhost").expect("handshake");
    connection.peer_certificates().expect("a certificate")[0].to_vec()
}

fn der_of(identity: &Identity) -> Vec<u8> {
    read_certificates("certificate file", &identity.cert_file).unwrap()[0].to_vec()
}

#[test]
fn a_replaced_certificate_is_presented_from_the_next_handshake_on() {
    let f = fixture();
    let certificate = Arc::new(ServerCertificate::load(f.localhost.clone()).unwrap());
    let first = der_of(&f.localhost);
    assert_eq!(certificate_seen(&f.pki, &certificate), first);
    assert_eq!(
        certificate.reload_if_changed().unwrap(),
        Reloaded::Unchanged
    );

    // A renewal writes a new certificate and key over the same files.
    let renewed = f.pki.server("localhost", &["localhost"]);
    assert_eq!(renewed, f.localhost, "the same files");
    let second = der_of(&renewed);
    assert_ne!(first, second);
    assert_eq!(
        certificate_seen(&f.pki, &certificate),
        first,
        "not before a reload"
    );
    assert_eq!(certificate.reload_if_changed().unwrap(), Reloaded::Replaced);
    assert_eq!(certificate_seen(&f.pki, &certificate), second);
    assert_eq!(certificate.presented().to_vec(), second);
    assert_eq!(
        certificate.reload_if_changed().unwrap(),
        Reloaded::Unchanged
    );
}

#[test]
fn a_failed_reload_keeps_presenting_the_previous_certificate() {
    let f = fixture();
    let certificate = Arc::new(ServerCertificate::load(f.localhost.clone()).unwrap());
    let first = der_of(&f.localhost);

    std::fs::write(&f.localhost.cert_file, "half a renewal").unwrap();
    let err = certificate.reload_if_changed().unwrap_err();
    assert!(
        err.to_string().contains("holds no PEM certificate"),
        "{err}"
    );
    assert_eq!(certificate_seen(&f.pki, &certificate), first);

    // A new certificate beside the old key (renewals write one file, then the other).
    let other = f.pki.server("other", &["localhost"]);
    std::fs::copy(&other.cert_file, &f.localhost.cert_file).unwrap();
    let err = certificate.reload_if_changed().unwrap_err();
    assert!(matches!(err, TlsError::Identity { .. }), "{err}");
    assert_eq!(certificate_seen(&f.pki, &certificate), first);

    // Once the key follows, the new certificate is taken.
    std::fs::copy(&other.key_file, &f.localhost.key_file).unwrap();
    assert_eq!(certificate.reload_if_changed().unwrap(), Reloaded::Replaced);
    assert_eq!(certificate_seen(&f.pki, &certificate), der_of(&other));
}

#[test]
fn a_certificate_and_a_key_that_do_not_match_are_refused_at_load() {
    let f = fixture();
    let other = f.pki.server("other", &["localhost"]);
    let mismatched = Identity {
        cert_file: f.localhost.cert_file.clone(),
        key_file: other.key_file.clone(),
    };
    let err = ServerCertificate::load(mismatched).unwrap_err();
    assert!(matches!(err, TlsError::Identity { .. }), "{err}");
    assert_path_named(&err.to_string(), &other.key_file);
}
