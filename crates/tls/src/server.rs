//! A listener's certificate, replaceable while the server runs: a renewed certificate is
//! picked up by the next handshake without a restart.

use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::{Identity, TlsError, parse_certificates, parse_private_key, provider, read};

/// What [`ServerCertificate::reload_if_changed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// Both files hold what was loaded last; nothing was replaced.
    Unchanged,
    /// The files changed and their new certificate is presented from the next handshake on.
    Replaced,
}

/// The certificate chain and key a server presents, read from two PEM files and read
/// again by [`reload_if_changed`](Self::reload_if_changed).
///
/// It is the rustls certificate resolver of the configuration [`server_config`](Self::server_config)
/// builds: every handshake takes the certificate loaded last. A reload that fails (a file
/// missing, half written, a key that does not match the certificate) replaces nothing: the
/// server goes on presenting the previous certificate, and the caller reports the error.
#[derive(Debug)]
pub struct ServerCertificate {
    identity: Identity,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' contents this key was made of, to tell whether they changed.
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl ServerCertificate {
    /// Reads the certificate chain and key of `identity`; they must go together.
    pub fn load(identity: Identity) -> Result<Self, TlsError> {
        let loaded = load(&identity)?;
        Ok(Self {
            identity,
            current: RwLock::new(loaded),
        })
    }

    /// The files this certificate is read from.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The certificate presented now (the end entity's, DER).
    pub fn presented(&self) -> rustls::pki_types::CertificateDer<'static> {
        self.lock_read().key.cert[0].clone()
    }

    /// Reads both files again and, when either changed, presents what they hold now.
    ///
    /// The files are compared by content, so a touched file or a renewal that rewrote the
    /// same certificate replaces nothing. On error the previous certificate stays.
    pub fn reload_if_changed(&self) -> Result<Reloaded, TlsError> {
        let cert_pem = read("certificate file", &self.identity.cert_file)?;
        let key_pem = read("key file", &self.identity.key_file)?;
        {
            let current = self.lock_read();
            if current.cert_pem == cert_pem && current.key_pem == key_pem {
                return Ok(Reloaded::Unchanged);
            }
        }
        let loaded = certified(&self.identity, cert_pem, key_pem)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
        Ok(Reloaded::Replaced)
    }

    /// A rustls server configuration presenting this certificate (the one loaded last, at
    /// every handshake), offering `alpn` in order of preference, asking for no client
    /// certificate.
    pub fn server_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(config)
    }

    fn lock_read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        // The lock guards a plain replacement; a panic elsewhere cannot leave it half done.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.lock_read().key))
    }
}

fn load(identity: &Identity) -> Result<Loaded, TlsError> {
    let cert_pem = read("certificate file", &identity.cert_file)?;
    let key_pem = read("key file", &identity.key_file)?;
    certified(identity, cert_pem, key_pem)
}

fn certified(identity: &Identity, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<Loaded, TlsError> {
    let chain = parse_certificates("certificate file", &identity.cert_file, &cert_pem)?;
    let key = parse_private_key("key file", &identity.key_file, &key_pem)?;
    let key =
        CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Identity {
            cert: identity.cert_file.clone(),
            key: identity.key_file.clone(),
            source,
        })?;
    Ok(Loaded {
        key: Arc::new(key),
        cert_pem,
        key_pem,
    })
}
