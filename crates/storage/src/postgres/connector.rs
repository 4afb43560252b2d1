//! TLS to PostgreSQL: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` read from the
//! connection string, and the rustls connector every connection of the store uses.
//!
//! tokio-postgres knows only `sslmode=disable|prefer|require` and refuses the other keys,
//! so they are taken out of the string here before it parses the rest. The modes mean
//! what they mean to libpq users:
//!
//! | `sslmode`     | TLS                                  | the server's certificate            |
//! |---------------|--------------------------------------|-------------------------------------|
//! | `disable`     | never                                | -                                   |
//! | `prefer`      | if the server offers it (default)    | chain checked when a CA is given    |
//! | `require`     | always                               | chain checked when a CA is given    |
//! | `verify-ca`   | always                               | chain (a CA is required)            |
//! | `verify-full` | always                               | chain and host name (CA required)   |
//!
//! The CA is `sslrootcert=<file>` (or `=system`: Mozilla's roots) or the store option
//! `database.tls_ca_file`; a client certificate for mutual TLS is `sslcert` + `sslkey` or
//! `database.tls_cert_file` + `database.tls_key_file`. Unlike libpq, nothing is read from
//! `~/.postgresql/`: every file is named.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::{OpenError, PgTlsOptions};

/// The TLS modes of libpq that this store supports (all but `allow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, OpenError> {
        match value {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            "allow" => Err(OpenError::InvalidTls(
                "sslmode=allow is not supported; use prefer (TLS when the server offers it) or disable"
                    .to_owned(),
            )),
            _ => Err(OpenError::InvalidTls(
                "sslmode must be disable, prefer, require, verify-ca or verify-full".to_owned(),
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// The TLS keys of a connection string, as written there.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct UrlTls {
    pub(crate) sslmode: Option<String>,
    pub(crate) sslrootcert: Option<String>,
    pub(crate) sslcert: Option<String>,
    pub(crate) sslkey: Option<String>,
}

impl UrlTls {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "sslmode" => Some(&mut self.sslmode),
            "sslrootcert" => Some(&mut self.sslrootcert),
            "sslcert" => Some(&mut self.sslcert),
            "sslkey" => Some(&mut self.sslkey),
            _ => None,
        }
    }
}

/// Splits the TLS keys off a connection string (a `postgres://` url or libpq's
/// `key=value` form): the string without them, for tokio-postgres, and their values.
/// A string this cannot read is returned as it is, for tokio-postgres to refuse.
pub(crate) fn take_tls_params(url: &str) -> (String, UrlTls) {
    let mut tls = UrlTls::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), tls);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match tls.slot(key) {
                Some(slot) => *slot = Some(percent_decode(value)),
                None => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, tls);
    }
    let Some(pairs) = key_value_pairs(url) else {
        return (url.to_owned(), tls);
    };
    let mut kept = Vec::new();
    for (key, value, text) in pairs {
        match tls.slot(&key) {
            Some(slot) => *slot = Some(value),
            None => kept.push(text),
        }
    }
    (kept.join(" "), tls)
}

/// `%XX` escapes decoded (as tokio-postgres decodes url values); invalid ones kept.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// libpq's `key = value` pairs (values quoted with `'…'` or bare, `\` escaping): each
/// key, its unescaped value and the pair's text as written; `None` if the string is not
/// of that form.
fn key_value_pairs(s: &str) -> Option<Vec<(String, String, &str)>> {
    let mut pairs = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i == bytes.len() {
            return Some(pairs);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_owned();
        skip_ws(&mut i);
        if i == bytes.len() || bytes[i] != b'=' || key.is_empty() {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = Vec::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return None,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        value.push(*bytes.get(i + 1)?);
                        i += 2;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(&b) = bytes.get(i) {
                if b.is_ascii_whitespace() {
                    break;
                }
                if b == b'\\' {
                    value.push(*bytes.get(i + 1)?);
                    i += 2;
                } else {
                    value.push(b);
                    i += 1;
                }
            }
        }
        pairs.push((key, String::from_utf8(value).ok()?, &s[start..i]));
    }
}

/// What the store connects with: the mode tokio-postgres runs the TLS negotiation in,
/// and the connector that makes the handshake.
#[derive(Clone)]
pub(crate) struct PgTls {
    pub(crate) mode: SslMode,
    /// What the server's certificate is checked for, for logs.
    pub(crate) verification: tls::Verification,
    connector: Option<TlsConnector>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl PgTls {
    /// The mode and connector that the url's TLS keys and the store options describe,
    /// with every file read now: a missing or unreadable file stops the start.
    pub(crate) fn resolve(url: &UrlTls, options: &PgTlsOptions) -> Result<Self, OpenError> {
        let mode = match &url.sslmode {
            Some(value) => SslMode::parse(value)?,
            None => SslMode::Prefer,
        };
        let ca = one_of(
            "sslrootcert",
            url.sslrootcert.as_deref(),
            "database.tls_ca_file",
            options.ca_file.as_deref(),
        )?;
        let cert = one_of(
            "sslcert",
            url.sslcert.as_deref(),
            "database.tls_cert_file",
            options.cert_file.as_deref(),
        )?;
        let key = one_of(
            "sslkey",
            url.sslkey.as_deref(),
            "database.tls_key_file",
            options.key_file.as_deref(),
        )?;
        let identity = match (cert, key) {
            (Some(cert_file), Some(key_file)) => Some(tls::Identity {
                cert_file,
                key_file,
            }),
            (None, None) => None,
            _ => {
                return Err(OpenError::InvalidTls(
                    "a client certificate needs both a certificate (sslcert or database.tls_cert_file) and its key (sslkey or database.tls_key_file)".to_owned(),
                ));
            }
        };
        let roots = ca.map(|path| {
            if path == Path::new("system") {
                tls::Roots::Mozilla
            } else {
                tls::Roots::File(path)
            }
        });
        let verification = match (mode, &roots) {
            (SslMode::VerifyFull, Some(_)) => tls::Verification::Full,
            (SslMode::VerifyCa, Some(_)) | (SslMode::Prefer | SslMode::Require, Some(_)) => {
                tls::Verification::Chain
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(OpenError::InvalidTls(format!(
                    "sslmode={} needs the CA that signed the server's certificate: sslrootcert=<file> in the url (or sslrootcert=system for a public CA), or database.tls_ca_file",
                    mode.name()
                )));
            }
            _ => tls::Verification::Nothing,
        };
        let connector = match mode {
            SslMode::Disable => None,
            _ => {
                let settings = tls::ClientSettings {
                    verification,
                    roots: roots.unwrap_or(tls::Roots::Mozilla),
                    identity,
                };
                let config = tls::client_config(&settings)
                    .map_err(|err| OpenError::InvalidTls(super::error_chain(&err)))?;
                Some(TlsConnector::from(Arc::new(config)))
            }
        };
        Ok(Self {
            mode,
            verification,
            connector,
        })
    }

    /// The mode tokio-postgres negotiates in: whether TLS is tried, and whether a server
    /// without it is refused.
    pub(crate) fn driver_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    /// `sslmode` and what is checked, for the start-up log line.
    pub(crate) fn describe(&self) -> String {
        let checked = match (self.mode, self.verification) {
            (SslMode::Disable, _) => "no TLS",
            (_, tls::Verification::Nothing) => "certificate not checked",
            (_, tls::Verification::Chain) => "certificate chain checked",
            (_, tls::Verification::Full) => "certificate chain and host name checked",
        };
        format!("sslmode={} ({checked})", self.mode.name())
    }
}

/// The one value of a setting that the url and the store options may both give.
fn one_of(
    url_key: &str,
    from_url: Option<&str>,
    option_key: &str,
    from_options: Option<&Path>,
) -> Result<Option<PathBuf>, OpenError> {
    match (from_url, from_options) {
        (Some(url), Some(option)) if Path::new(url) != option => Err(OpenError::InvalidTls(
            format!("the url's {url_key} and {option_key} name different files; give one"),
        )),
        (Some(url), _) => Ok(Some(PathBuf::from(url))),
        (None, option) => Ok(option.map(Path::to_owned)),
    }
}

/// Why a failed TLS negotiation failed, in an operator's words, when rustls's own are not
/// enough: `None` for anything else.
pub(crate) fn hint(err: &tokio_postgres::Error) -> Option<&'static str> {
    use tokio_rustls::rustls::{CertificateError, Error};

    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if cause.to_string() == "server does not support TLS" {
            return Some(
                "the server does not accept TLS (ssl = off): turn it on, or use sslmode=prefer or disable",
            );
        }
        let rustls_error = cause.downcast_ref::<Error>().or_else(|| {
            cause
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Error>())
        });
        if let Some(Error::InvalidCertificate(certificate)) = rustls_error {
            return Some(match certificate {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    "the server's certificate is not signed by the CA given (sslrootcert or database.tls_ca_file)"
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "the server's certificate was not issued for the host name in the url (verify-full checks it, verify-ca does not)"
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the server's certificate has expired"
                }
                _ => "the server's certificate is refused",
            });
        }
        source = cause.source();
    }
    None
}

/// Whether a failed connect failed in the TLS negotiation for a reason that trying again
/// does not fix: a refused certificate, a server without TLS under `require`.
pub(crate) fn is_permanent(err: &tokio_postgres::Error) -> bool {
    tls::is_permanent(err) || hint(err).is_some()
}

impl MakeTlsConnect<Socket> for PgTls {
    type Stream = PgTlsStream;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        Ok(PgTlsConnect {
            connector: self.connector.clone(),
            name,
        })
    }
}

/// One connection's handshake with the host it is made to.
pub(crate) struct PgTlsConnect {
    connector: Option<TlsConnector>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for PgTlsConnect {
    type Stream = PgTlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            // tokio-postgres never asks under `sslmode=disable`, the only mode without one.
            let connector = self.connector.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "TLS is disabled (sslmode=disable)",
                )
            })?;
            let stream = connector.connect(self.name, stream).await?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// An encrypted connection to the server.
///
/// No channel binding (`tls-server-end-point` would need the hash algorithm of the
/// server certificate's signature): SCRAM authenticates without it.
pub(crate) struct PgTlsStream(tokio_rustls::client::TlsStream<Socket>);

impl TlsStream for PgTlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for PgTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PgTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(url: &str) -> (String, UrlTls) {
        take_tls_params(url)
    }

    #[test]
    fn url_tls_keys_are_taken_out_and_the_rest_kept_in_order() {
        let (rest, tls) = taken(
            "postgres://u:p@db:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3&sslcert=c.pem&sslkey=k.pem",
        );
        assert_eq!(
            rest,
            "postgres://u:p@db:5432/app?application_name=x&connect_timeout=3"
        );
        assert_eq!(
            tls,
            UrlTls {
                sslmode: Some("verify-full".into()),
                sslrootcert: Some("/etc/ca.pem".into()),
                sslcert: Some("c.pem".into()),
                sslkey: Some("k.pem".into()),
            }
        );
        let (rest, tls) = taken("postgresql://db/app?sslmode=require");
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(tls.sslmode.as_deref(), Some("require"));
        let (rest, tls) = taken("postgres://db/app");
        assert_eq!(
            (rest.as_str(), tls),
            ("postgres://db/app", UrlTls::default())
        );
    }

    #[test]
    fn key_value_tls_keys_are_taken_out_with_quotes_and_escapes() {
        let (rest, tls) = taken(
            "host=db  sslmode = verify-ca sslrootcert='/a dir/ca.pem' password='it\\'s' sslkey=k\\ y",
        );
        assert_eq!(rest, "host=db password='it\\'s'");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/a dir/ca.pem"));
        assert_eq!(tls.sslkey.as_deref(), Some("k y"));
        // Not of either form: left for tokio-postgres to refuse.
        assert_eq!(taken("host=").0, "host=");
        assert_eq!(taken("nonsense").0, "nonsense");
    }

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(percent_decode("%2Fa%20b"), "/a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%2"), "%zz%2");
    }

    fn resolve(url: &str, options: &PgTlsOptions) -> Result<PgTls, String> {
        PgTls::resolve(&take_tls_params(url).1, options).map_err(|err| err.to_string())
    }

    #[test]
    fn modes_map_to_what_libpq_checks() {
        let dir = tempfile::tempdir().unwrap();
        let pki = tls::testing::TestPki::new(dir.path(), "pg");
        let ca = pki.ca_file().display().to_string();
        let none = PgTlsOptions::default();
        let cases = [
            ("", SslMode::Prefer, tls::Verification::Nothing),
            (
                "?sslmode=disable",
                SslMode::Disable,
                tls::Verification::Nothing,
            ),
            (
                "?sslmode=require",
                SslMode::Require,
                tls::Verification::Nothing,
            ),
            (
                &*format!("?sslmode=require&sslrootcert={ca}"),
                SslMode::Require,
                tls::Verification::Chain,
            ),
            (
                &*format!("?sslrootcert={ca}"),
                SslMode::Prefer,
                tls::Verification::Chain,
            ),
            (
                &*format!("?sslmode=verify-ca&sslrootcert={ca}"),
                SslMode::VerifyCa,
                tls::Verification::Chain,
            ),
            (
                &*format!("?sslmode=verify-full&sslrootcert={ca}"),
                SslMode::VerifyFull,
                tls::Verification::Full,
            ),
            (
                "?sslmode=verify-full&sslrootcert=system",
                SslMode::VerifyFull,
                tls::Verification::Full,
            ),
        ];
        for (query, mode, verification) in cases {
            let tls = resolve(&format!("postgres://db/app{query}"), &none).expect(query);
            assert_eq!(
                (tls.mode, tls.verification),
                (mode, verification),
                "{query}"
            );
        }
        // The CA from the options instead of the url.
        let options = PgTlsOptions {
            ca_file: Some(pki.ca_file().to_owned()),
            ..PgTlsOptions::default()
        };
        let tls = resolve("postgres://db/app?sslmode=verify-full", &options).unwrap();
        assert_eq!(tls.verification, tls::Verification::Full);
        assert_eq!(
            tls.describe(),
            "sslmode=verify-full (certificate chain and host name checked)"
        );
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_their_reason() {
        let none = PgTlsOptions::default();
        let err = resolve("postgres://db/app?sslmode=verify-full", &none).unwrap_err();
        assert!(err.contains("sslmode=verify-full needs the CA"), "{err}");
        let err = resolve("postgres://db/app?sslmode=allow", &none).unwrap_err();
        assert!(err.contains("sslmode=allow is not supported"), "{err}");
        let err = resolve("postgres://db/app?sslmode=on", &none).unwrap_err();
        assert!(err.contains("sslmode must be"), "{err}");
        let err = resolve("postgres://db/app?sslcert=c.pem", &none).unwrap_err();
        assert!(err.contains("needs both a certificate"), "{err}");
        let options = PgTlsOptions {
            ca_file: Some(PathBuf::from("/b.pem")),
            ..PgTlsOptions::default()
        };
        let err = resolve("postgres://db/app?sslrootcert=/a.pem", &options).unwrap_err();
        assert!(
            err.contains("the url's sslrootcert and database.tls_ca_file name different files"),
            "{err}"
        );
        let err = resolve(
            "postgres://db/app?sslmode=verify-ca&sslrootcert=/nowhere/ca.pem",
            &none,
        )
        .unwrap_err();
        assert!(
            err.contains("cannot read the CA file /nowhere/ca.pem"),
            "{err}"
        );
    }
}
