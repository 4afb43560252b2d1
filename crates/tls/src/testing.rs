//! Throwaway certificates for tests: a certificate authority and the server and client
//! certificates it signs, written as PEM files into a directory the test owns (and the
//! local compose stack's, made by `cargo xtask compose up`), and an in-memory handshake
//! to check a client configuration against a server's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::Identity;

/// A test certificate authority whose certificate is at [`TestPki::ca_file`].
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
}

impl TestPki {
    /// A new authority named `name`, its certificate written to `dir/{name}-ca.pem`.
    ///
    /// # Panics
    /// If the key cannot be generated or the file cannot be written: a test cannot go on.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        write(&ca_file, &issuer.pem());
        Self {
            dir: dir.to_owned(),
            issuer,
            ca_file,
        }
    }

    /// The authority's certificate, PEM: what a client trusts.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this
    /// authority, written to `dir/{file_stem}.pem` and `dir/{file_stem}.key` (mode 0600,
    /// as PostgreSQL wants its key).
    pub fn server(&self, file_stem: &str, names: &[&str]) -> Identity {
        let names: Vec<String> = names.iter().map(|&name| name.to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("server params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file_stem, params)
    }

    /// A client certificate whose common name is `user` (PostgreSQL's `cert`
    /// authentication maps it to the role), written like [`TestPki::server`]'s.
    pub fn client(&self, file_stem: &str, user: &str) -> Identity {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file_stem, params)
    }

    fn issue(&self, file_stem: &str, params: CertificateParams) -> Identity {
        let key = KeyPair::generate().expect("key");
        let certificate = params.signed_by(&key, &self.issuer).expect("certificate");
        let cert_file = self.dir.join(format!("{file_stem}.pem"));
        let key_file = self.dir.join(format!("{file_stem}.key"));
        write(&cert_file, &certificate.pem());
        write(&key_file, &key.serialize_pem());
        restrict(&key_file);
        Identity {
            cert_file,
            key_file,
        }
    }
}

fn write(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
}

#[cfg(unix)]
fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|err| panic!("chmod {}: {err}", path.display()));
}

#[cfg(not(unix))]
fn restrict(_path: &Path) {}

/// Runs a whole handshake between the two configurations, in memory; the first error of
/// either side.
///
/// # Panics
/// If it has not finished after 20 round trips.
pub fn handshake(
    client: ClientConfig,
    server: ServerConfig,
    name: &str,
) -> Result<ClientConnection, rustls::Error> {
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    let mut client = ClientConnection::new(Arc::new(client), name)?;
    let mut server = ServerConnection::new(Arc::new(server))?;
    for _ in 0..20 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(client);
        }
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("write to memory");
        }
        server
            .read_tls(&mut wire.as_slice())
            .expect("read from memory");
        let server_state = server.process_new_packets();
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).expect("write to memory");
        }
        client
            .read_tls(&mut wire.as_slice())
            .expect("read from memory");
        client.process_new_packets()?;
        server_state?;
    }
    panic!("the handshake did not finish in 20 rounds");
}
