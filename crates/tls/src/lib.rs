//! TLS for the adapters: rustls client configurations built from PEM files, with one
//! crypto provider (ring) for the whole process, so PostgreSQL, the upstream and the
//! listeners share one TLS stack and no OpenSSL or aws-lc is built.
//!
//! A configuration is described by [`ClientSettings`]: how much of the server's
//! certificate to check ([`Verification`]), which authorities to trust ([`Roots`]), and an
//! optional client certificate ([`Identity`]) for mutual TLS. [`client_config`] reads the
//! files and returns the rustls configuration, or a [`TlsError`] that names the file and
//! what is wrong with it, so a bad setting stops the service at start with its cause.
//!
//! With the `testing` feature, [`testing::TestPki`] writes a throwaway certificate
//! authority and certificates for the tests of this and other crates.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

pub use rustls;

mod server;
#[cfg(feature = "testing")]
pub mod testing;

pub use server::{Reloaded, ServerCertificate};

/// The process's crypto provider: ring, with rustls's default cipher suites and key
/// exchange groups (X25519, P-256, P-384).
///
/// rustls deprecates ring's provider because it has no post-quantum key exchange
/// (X25519MLKEM768, aws-lc-rs only); aws-lc-rs is a large C and CMake build, which a clean
/// build on two cores should not pay for. The cost: a recorded session could be decrypted
/// by a future quantum computer. Revisit when ring gains ML-KEM or aws-lc-rs builds cheaply.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    #[expect(
        deprecated,
        reason = "ring over aws-lc-rs, for the build's sake; see above"
    )]
    let make = rustls::crypto::ring::default_provider;
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(make())))
}

/// Makes [`provider`] the process's default rustls provider, once; later calls do nothing.
///
/// reqwest is built without a provider of its own (its `rustls-no-provider` feature, so
/// that aws-lc-rs is not built): any reqwest client that is not handed a configuration
/// from [`client_config`] (a plain `reqwest::Client::new()`) takes the process default,
/// and panics when there is none. Every binary calls this first thing; so do the test and
/// tool harnesses before they build a client.
pub fn install_default_provider() {
    if CryptoProvider::get_default().is_none() {
        // Another thread may have won the race: its provider is ours too.
        let _ = CryptoProvider::install_default((*provider()).clone());
    }
}

/// How much of the server's certificate a client checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Nothing: the connection is encrypted, but whoever answers is trusted (PostgreSQL's
    /// `sslmode=prefer` and `require` without a root certificate). The server still has to
    /// prove it holds the key of the certificate it shows.
    Nothing,
    /// The certificate chains up to a trusted root and is valid now; the name it was issued
    /// for is not checked (`sslmode=verify-ca`).
    Chain,
    /// The chain and the name: the certificate was issued for the host (or IP address) the
    /// client connects to (`sslmode=verify-full`, and every https client).
    Full,
}

/// The certificate authorities a client trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// Mozilla's root program, compiled in (`webpki-roots`): public servers.
    Mozilla,
    /// Every certificate in a PEM file: a private CA.
    File(PathBuf),
}

/// The ALPN protocols of HTTPS, in order of preference: HTTP/2, then HTTP/1.1. Both the
/// upstream client and the listeners offer these.
pub const HTTP_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// [`HTTP_ALPN`] as a rustls configuration's `alpn_protocols`.
pub fn http_alpn() -> Vec<Vec<u8>> {
    HTTP_ALPN.iter().map(|protocol| protocol.to_vec()).collect()
}

/// A client certificate and its private key, both PEM files, for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The certificate, then any intermediates, PEM.
    pub cert_file: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// Everything a client configuration is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// How much of the server's certificate is checked.
    pub verification: Verification,
    /// Whom to trust; unused under [`Verification::Nothing`].
    pub roots: Roots,
    /// The client certificate, if the server asks for one.
    pub identity: Option<Identity>,
}

/// Why a TLS configuration cannot be built. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {what} {}", path.display())]
    Read {
        /// What the file should hold ("CA file", "certificate file", "key file").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// A file holds nothing usable of what it should hold.
    #[error("the {what} {} {problem}", path.display())]
    Content {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, as a predicate ("holds no PEM certificate").
        problem: String,
    },
    /// The certificate and key do not go together, or rustls refuses them.
    #[error("the certificate {} and key {} cannot be used: {source}", cert.display(), key.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// rustls refuses the configuration itself (a provider without usable cipher suites).
    #[error("invalid TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Reads every certificate of a PEM file (at least one).
pub fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certificates(what, path, &read(what, path)?)
}

/// The certificates of `pem`, the contents of `path` (named in errors).
fn parse_certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| content(what, path, format!("is not valid PEM: {err}")))?;
    if certificates.is_empty() {
        return Err(content(what, path, "holds no PEM certificate".to_owned()));
    }
    Ok(certificates)
}

/// Reads the private key of a PEM file: its first key of any supported kind.
pub fn read_private_key(
    what: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    parse_private_key(what, path, &read(what, path)?)
}

/// The first private key of `pem`, the contents of `path` (named in errors).
fn parse_private_key(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| {
        let problem = match err {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned()
            }
            other => format!("is not a valid PEM private key: {other}"),
        };
        content(what, path, problem)
    })
}

/// The roots a client trusts, each one checked: a file whose certificates are not usable
/// as trust anchors is refused, not silently skipped.
pub fn root_store(roots: &Roots) -> Result<RootCertStore, TlsError> {
    match roots {
        Roots::Mozilla => Ok(RootCertStore::from_iter(
            webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
        )),
        Roots::File(path) => {
            const WHAT: &str = "CA file";
            let mut store = RootCertStore::empty();
            for certificate in read_certificates(WHAT, path)? {
                store.add(certificate).map_err(|err| {
                    content(
                        WHAT,
                        path,
                        format!("holds an unusable CA certificate: {err}"),
                    )
                })?;
            }
            Ok(store)
        }
    }
}

/// The rustls client configuration `settings` describe, its files read and checked.
pub fn client_config(settings: &ClientSettings) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match settings.verification {
        Verification::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(
                provider.signature_verification_algorithms,
            ))),
        verification => {
            let roots = Arc::new(root_store(&settings.roots)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|err| TlsError::Config(rustls::Error::General(err.to_string())))?;
            if verification == Verification::Full {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            }
        }
    };
    match &settings.identity {
        None => Ok(builder.with_no_client_auth()),
        Some(identity) => {
            let chain = read_certificates("certificate file", &identity.cert_file)?;
            let key = read_private_key("key file", &identity.key_file)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::Identity {
                    cert: identity.cert_file.clone(),
                    key: identity.key_file.clone(),
                    source,
                })
        }
    }
}

/// The rustls server configuration presenting `identity` (certificate chain and key), no
/// client certificate asked for.
pub fn server_config(identity: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let chain = read_certificates("certificate file", &identity.cert_file)?;
    let key = read_private_key("key file", &identity.key_file)?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Identity {
            cert: identity.cert_file.clone(),
            key: identity.key_file.clone(),
            source,
        })
}

/// Whether `err` is a TLS failure that trying again does not fix: the peer's certificate
/// refused, a protocol the two sides do not share, an alert from the peer. I/O errors
/// (a reset during the handshake) are not: they are the network's.
pub fn is_permanent(err: &(dyn std::error::Error + 'static)) -> bool {
    if err.is::<rustls::Error>() {
        return true;
    }
    // tokio-rustls reports rustls's errors as I/O errors around them, and an I/O error's
    // `source()` skips what it wraps (it answers the wrapped error's source): look inside.
    if let Some(inner) = err
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
        && is_permanent(inner)
    {
        return true;
    }
    err.source().is_some_and(is_permanent)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn content(what: &'static str, path: &Path, problem: String) -> TlsError {
    TlsError::Content {
        what,
        path: path.to_owned(),
        problem,
    }
}

/// [`Verification::Chain`]: WebPKI's checks, except the name. WebPKI checks the name
/// last, so a certificate refused only for its name has passed everything else.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// [`Verification::Nothing`]: any certificate, but the handshake's signatures are still
/// checked against it, so the peer holds its key.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
