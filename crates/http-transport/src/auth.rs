//! Who may call the public API: bearer API keys, or callbacks signed as Standard Webhooks
//! (<https://www.standardwebhooks.com>) with a shared secret and a replay window.
//!
//! Off by default ([`AuthMode::None`]). The health route and the admin listener are never
//! checked. A callback's signature covers its body, so `POST /callback` is checked in two
//! steps: the headers before the body is read ([`Auth::check_callback`]), the signature once
//! it is read and before it is parsed or recorded ([`Pending::verify`]). API keys are kept
//! only as SHA-256 digests; neither they nor the secrets are ever logged or shown by `Debug`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher as _, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use domain::Timestamp;
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};

use crate::error::ApiError;
use crate::router::echo;

/// How callers of the public API prove who they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuthMode {
    /// Anyone may call (the default).
    #[default]
    None,
    /// Every checked request carries `Authorization: Bearer <api key>`.
    Bearer,
    /// Every callback carries the Standard Webhooks headers, signed with a shared secret;
    /// reads, which have no body to sign, carry a bearer API key.
    StandardWebhooks,
}

/// Who may call the public API (`HttpConfig::auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// How callers authenticate.
    pub mode: AuthMode,
    /// The bearer keys accepted: for every checked request under [`AuthMode::Bearer`], for
    /// the reads under [`AuthMode::StandardWebhooks`].
    pub api_keys: Vec<ApiKey>,
    /// The Standard Webhooks secrets a callback may be signed with; several at once while
    /// one replaces another.
    pub webhook_secrets: Vec<WebhookSecret>,
    /// How far `webhook-timestamp` may be from the server's clock, either way; a
    /// `webhook-id` is remembered for as long as its message stays inside it.
    pub tolerance: Duration,
    /// Whether `GET /objects` and `GET /objects/{id}` are checked too (with a bearer key).
    pub protect_reads: bool,
    /// The most `webhook-id`s remembered at once; past it the oldest are forgotten early.
    pub max_remembered_ids: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            api_keys: Vec::new(),
            webhook_secrets: Vec::new(),
            tolerance: Duration::from_secs(300),
            protect_reads: true,
            max_remembered_ids: 1_000_000,
        }
    }
}

/// Why a key or a secret cannot be used; the text never includes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Nothing was given.
    #[error("must not be empty")]
    Empty,
    /// A key that an HTTP header cannot carry as it is.
    #[error("must be visible ascii characters without spaces (it is sent in a header)")]
    NotHeaderText,
    /// A Standard Webhooks secret without its prefix.
    #[error("must start with whsec_")]
    MissingPrefix,
    /// A Standard Webhooks secret whose key is not base64.
    #[error("must be base64 after whsec_")]
    NotBase64,
    /// A Standard Webhooks secret whose key is too short or too long.
    #[error("decodes to {0} bytes; a secret is 24 to 64 random bytes")]
    Length(usize),
}

/// A bearer API key, kept only as its SHA-256 digest.
#[derive(Clone, Eq)]
pub struct ApiKey([u8; 32]);

impl ApiKey {
    /// The key `text`, as a caller sends it after `Bearer `.
    pub fn new(text: &str) -> Result<Self, CredentialError> {
        if text.is_empty() {
            return Err(CredentialError::Empty);
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CredentialError::NotHeaderText);
        }
        Ok(Self(digest(text.as_bytes())))
    }
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        digests_equal(&self.0, &other.0)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// A Standard Webhooks signing secret: the key decoded from `whsec_<base64>`.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

/// The shortest and longest key the specification allows, in bytes.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

impl WebhookSecret {
    /// Reads `whsec_<base64>` (padding optional, as the reference libraries accept it).
    pub fn parse(text: &str) -> Result<Self, CredentialError> {
        if text.is_empty() {
            return Err(CredentialError::Empty);
        }
        let encoded = text
            .strip_prefix("whsec_")
            .ok_or(CredentialError::MissingPrefix)?;
        let key = BASE64
            .decode(encoded)
            .map_err(|_| CredentialError::NotBase64)?;
        if !SECRET_BYTES.contains(&key.len()) {
            return Err(CredentialError::Length(key.len()));
        }
        Ok(Self(key))
    }

    /// The `v1,<base64>` signature of a message, as its sender writes it in
    /// `webhook-signature`: HMAC-SHA256 of `{id}.{timestamp}.{body}`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", BASE64.encode(tag))
    }

    /// The HMAC of the signed content, ready to finalize or verify.
    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any size");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

/// Standard base64 that decodes with or without padding; encodes with it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Whether two digests are equal, in a time that does not depend on where they differ:
/// every byte is compared, the differences folded together, no early exit.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Why a request was refused, the `reason` of `auth_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// No credentials: a header is absent.
    Missing,
    /// Credentials that do not prove anything: malformed, an unknown key, a bad signature.
    Invalid,
    /// A `webhook-timestamp` outside the tolerance, either way.
    Expired,
    /// A `webhook-id` already accepted within its window.
    Replayed,
}

impl Reason {
    /// Every reason, for registering the series at start.
    pub(crate) const ALL: [Reason; 4] = [
        Reason::Missing,
        Reason::Invalid,
        Reason::Expired,
        Reason::Replayed,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Invalid => "invalid",
            Reason::Expired => "expired",
            Reason::Replayed => "replayed",
        }
    }
}

/// The `WWW-Authenticate` challenge of a request checked for a bearer key.
const BEARER_CHALLENGE: &str = r#"Bearer realm="callback-service""#;
/// The `WWW-Authenticate` challenge of a callback checked for a Standard Webhooks signature.
const WEBHOOK_CHALLENGE: &str = r#"Webhook realm="callback-service""#;

/// A refused request: why, the challenge to answer with, and what to tell the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) reason: Reason,
    challenge: &'static str,
    message: String,
}

impl Rejection {
    fn bearer(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            challenge: BEARER_CHALLENGE,
            message: message.into(),
        }
    }

    fn webhook(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            challenge: WEBHOOK_CHALLENGE,
            message: message.into(),
        }
    }
}

impl From<Rejection> for ApiError {
    /// A `401`, counted in `auth_rejections_total` by its reason.
    fn from(rejection: Rejection) -> Self {
        crate::metrics::auth_rejected(rejection.reason.label());
        ApiError::Unauthorized {
            message: rejection.message,
            challenge: rejection.challenge,
        }
    }
}

/// The checks of the public API, over its [`AuthConfig`], with the `webhook-id`s seen.
#[derive(Debug)]
pub(crate) struct Auth {
    config: AuthConfig,
    seen: ReplayCache,
}

/// The longest `webhook-id` accepted, in bytes.
const MAX_ID_BYTES: usize = 256;

impl Auth {
    pub(crate) fn new(config: AuthConfig) -> Self {
        let seen = ReplayCache::new(config.max_remembered_ids);
        Self { config, seen }
    }

    /// Checks a read (`GET /objects`, `GET /objects/{id}`): a bearer key while auth is on
    /// and reads are protected.
    pub(crate) fn check_read(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        if self.config.mode == AuthMode::None || !self.config.protect_reads {
            return Ok(());
        }
        self.check_bearer(headers)
    }

    /// Checks what a callback's headers can prove before its body is read, at `now`: the
    /// bearer key, or the Standard Webhooks headers and the timestamp; the signature is
    /// left to [`Pending::verify`].
    pub(crate) fn check_callback(
        &self,
        headers: &HeaderMap,
        now: Timestamp,
    ) -> Result<Pending<'_>, Rejection> {
        let signed = match self.config.mode {
            AuthMode::None => None,
            AuthMode::Bearer => {
                self.check_bearer(headers)?;
                None
            }
            AuthMode::StandardWebhooks => Some(self.signed_headers(headers, now)?),
        };
        Ok(Pending { auth: self, signed })
    }

    fn check_bearer(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(Rejection::bearer(
                Reason::Missing,
                "missing authorization header: send `Authorization: Bearer <api key>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                Rejection::bearer(
                    Reason::Invalid,
                    "the authorization header must be `Bearer <api key>`",
                )
            })?;
        let presented = digest(token.as_bytes());
        // Every key is compared, matched or not.
        let known = self.config.api_keys.iter().fold(false, |known, key| {
            known | digests_equal(&key.0, &presented)
        });
        if known {
            Ok(())
        } else {
            Err(Rejection::bearer(
                Reason::Invalid,
                "the api key is not accepted",
            ))
        }
    }

    fn signed_headers(&self, headers: &HeaderMap, now: Timestamp) -> Result<Signed, Rejection> {
        let id = webhook_header(headers, "webhook-id")?;
        let timestamp = webhook_header(headers, "webhook-timestamp")?;
        let signatures = webhook_header(headers, "webhook-signature")?;

        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return Err(Rejection::webhook(
                Reason::Invalid,
                format!("webhook-id must have 1 to {MAX_ID_BYTES} characters"),
            ));
        }
        let timestamp: i64 = timestamp.parse().map_err(|_| {
            Rejection::webhook(
                Reason::Invalid,
                format!(
                    "webhook-timestamp must be whole seconds since the unix epoch, got {:?}",
                    echo(timestamp)
                ),
            )
        })?;
        let sent = Timestamp::from_unix_micros(timestamp.saturating_mul(1_000_000));
        let tolerance = self.config.tolerance;
        let behind = now.saturating_duration_since(sent);
        let ahead = sent.saturating_duration_since(now);
        if behind > tolerance || ahead > tolerance {
            let (by, way) = if behind > tolerance {
                (behind, "old")
            } else {
                (ahead, "in the future")
            };
            return Err(Rejection::webhook(
                Reason::Expired,
                format!(
                    "webhook-timestamp is {} s {way}, outside the tolerance of {} s",
                    by.as_secs(),
                    tolerance.as_secs()
                ),
            ));
        }
        // Other versions (`v1a`, asymmetric signatures) are ignored, as are entries that
        // cannot be an HMAC-SHA256 at all.
        let signatures: Vec<Vec<u8>> = signatures
            .split_whitespace()
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|encoded| BASE64.decode(encoded).ok())
            .filter(|tag| tag.len() == 32)
            .collect();
        if signatures.is_empty() {
            return Err(Rejection::webhook(
                Reason::Invalid,
                "webhook-signature holds no v1 signature",
            ));
        }
        Ok(Signed {
            id: id.to_owned(),
            timestamp,
            signatures,
            remember_until: sent.saturating_add(tolerance),
            now,
        })
    }
}

/// The text of the Standard Webhooks header `name`.
fn webhook_header<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, Rejection> {
    let value = headers.get(name).ok_or_else(|| {
        Rejection::webhook(
            Reason::Missing,
            format!(
                "missing {name} header: a callback carries webhook-id, webhook-timestamp and webhook-signature (Standard Webhooks)"
            ),
        )
    })?;
    value
        .to_str()
        .map_err(|_| Rejection::webhook(Reason::Invalid, format!("the {name} header is not text")))
}

/// The Standard Webhooks headers of a callback whose body is still to be verified.
#[derive(Debug)]
struct Signed {
    id: String,
    timestamp: i64,
    signatures: Vec<Vec<u8>>,
    /// The end of the message's window: a replay after it fails the timestamp check.
    remember_until: Timestamp,
    now: Timestamp,
}

/// A callback whose headers passed [`Auth::check_callback`].
#[derive(Debug)]
pub(crate) struct Pending<'a> {
    auth: &'a Auth,
    /// `None` when the headers proved everything (no auth, or a bearer key).
    signed: Option<Signed>,
}

impl<'a> Pending<'a> {
    /// Checks the signature over the whole `body`, then that its `webhook-id` was not
    /// accepted before; the id stays claimed while the [`Admitted`] lives.
    pub(crate) fn verify(self, body: &[u8]) -> Result<Admitted<'a>, Rejection> {
        let Some(signed) = self.signed else {
            return Ok(Admitted(None));
        };
        let mut matched = false;
        for secret in &self.auth.config.webhook_secrets {
            let mac = secret.mac(&signed.id, signed.timestamp, body);
            for signature in &signed.signatures {
                // `verify_slice` compares in constant time.
                matched |= mac.clone().verify_slice(signature).is_ok();
            }
        }
        if !matched {
            return Err(Rejection::webhook(
                Reason::Invalid,
                "no signature in webhook-signature matches the message with a configured secret",
            ));
        }
        let claim = self
            .auth
            .seen
            .claim(&signed.id, signed.remember_until, signed.now)
            .ok_or_else(|| {
                Rejection::webhook(
                    Reason::Replayed,
                    format!(
                        "webhook-id {:?} was accepted already: a message is accepted once",
                        echo(&signed.id)
                    ),
                )
            })?;
        Ok(Admitted(Some(claim)))
    }
}

/// An authenticated callback. Its `webhook-id`, if any, is released again when this is
/// dropped without [`Admitted::keep`], so the sender may retry a callback that failed.
#[derive(Debug)]
pub(crate) struct Admitted<'a>(Option<Claim<'a>>);

impl Admitted<'_> {
    /// The callback was recorded: its `webhook-id` stays remembered for its window.
    pub(crate) fn keep(self) {
        if let Some(mut claim) = self.0 {
            claim.kept = true;
        }
    }
}

/// The `webhook-id`s accepted recently, each until its message's window ends, at most
/// `capacity` of them (the oldest go first); in memory, so per instance.
///
/// Ids are kept as 64-bit hashes under a per-process random key: a collision would refuse
/// one genuine message as a replay, with odds of about one in 10^13 per message when full.
struct ReplayCache {
    hasher: RandomState,
    capacity: usize,
    remembered: Mutex<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    /// Id hash → end of its window (µs since the epoch).
    until: HashMap<u64, i64>,
    /// `(until, hash)` in the order they were claimed, for forgetting.
    order: VecDeque<(i64, u64)>,
}

impl Remembered {
    /// Drops the oldest claim, and its id unless it was claimed again since.
    fn forget_oldest(&mut self) {
        if let Some((until, key)) = self.order.pop_front()
            && self.until.get(&key) == Some(&until)
        {
            self.until.remove(&key);
        }
    }
}

impl ReplayCache {
    fn new(capacity: usize) -> Self {
        Self {
            hasher: RandomState::new(),
            capacity: capacity.max(1),
            remembered: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Remembered> {
        self.remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers `id` until `until` (inclusive) and returns the claim, unless it is
    /// remembered at `now` already.
    fn claim(&self, id: &str, until: Timestamp, now: Timestamp) -> Option<Claim<'_>> {
        let key = self.hasher.hash_one(id);
        let until = until.as_unix_micros();
        let now = now.as_unix_micros();
        let mut remembered = self.lock();
        while remembered
            .order
            .front()
            .is_some_and(|&(oldest, _)| oldest < now)
        {
            remembered.forget_oldest();
        }
        if remembered.until.get(&key).is_some_and(|&end| end >= now) {
            return None;
        }
        while remembered.order.len() >= self.capacity {
            remembered.forget_oldest();
        }
        remembered.until.insert(key, until);
        remembered.order.push_back((until, key));
        Some(Claim {
            cache: self,
            key,
            until,
            kept: false,
        })
    }
}

impl fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayCache")
            .field("remembered", &self.lock().until.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// A `webhook-id` claimed by a callback in progress.
#[derive(Debug)]
struct Claim<'a> {
    cache: &'a ReplayCache,
    key: u64,
    until: i64,
    kept: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let mut remembered = self.cache.lock();
        if remembered.until.get(&self.key) == Some(&self.until) {
            remembered.until.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    /// The example of the specification's libraries (Python, JavaScript, Go test suites).
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &str = r#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    /// The example of the specification's Rust library.
    const RUST_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const RUST_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const RUST_TIMESTAMP: i64 = 1_649_367_553;
    const RUST_BODY: &str = r#"{"email":"test@example.com","username":"test_user"}"#;
    const RUST_SIGNATURE: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_unix_micros(seconds * 1_000_000)
    }

    fn secret(text: &str) -> WebhookSecret {
        WebhookSecret::parse(text).expect("a valid secret")
    }

    fn webhooks(secrets: &[&str]) -> Auth {
        Auth::new(AuthConfig {
            mode: AuthMode::StandardWebhooks,
            webhook_secrets: secrets.iter().map(|s| secret(s)).collect(),
            api_keys: vec![ApiKey::new("reader").unwrap()],
            ..AuthConfig::default()
        })
    }

    fn bearer(keys: &[&str]) -> Auth {
        Auth::new(AuthConfig {
            mode: AuthMode::Bearer,
            api_keys: keys.iter().map(|k| ApiKey::new(k).unwrap()).collect(),
            ..AuthConfig::default()
        })
    }

    fn signed_headers(id: &str, timestamp: i64, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", HeaderValue::from_str(id).unwrap());
        headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
        headers.insert(
            "webhook-signature",
            HeaderValue::from_str(signature).unwrap(),
        );
        headers
    }

    fn authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    /// The whole check of one callback at `now`; an accepted one keeps its id.
    fn callback(
        auth: &Auth,
        headers: &HeaderMap,
        body: &str,
        now: Timestamp,
    ) -> Result<(), Reason> {
        let pending = auth.check_callback(headers, now).map_err(|r| r.reason)?;
        pending
            .verify(body.as_bytes())
            .map(Admitted::keep)
            .map_err(|r| r.reason)
    }

    #[test]
    fn the_specifications_examples_sign_and_verify() {
        for (key, id, timestamp, body, signature) in [
            (
                SPEC_SECRET,
                SPEC_ID,
                SPEC_TIMESTAMP,
                SPEC_BODY,
                SPEC_SIGNATURE,
            ),
            (
                RUST_SECRET,
                RUST_ID,
                RUST_TIMESTAMP,
                RUST_BODY,
                RUST_SIGNATURE,
            ),
        ] {
            assert_eq!(secret(key).sign(id, timestamp, body.as_bytes()), signature);
            let auth = webhooks(&[key]);
            let headers = signed_headers(id, timestamp, signature);
            assert_eq!(
                callback(&auth, &headers, body, at(timestamp)),
                Ok(()),
                "{id}"
            );
        }
    }

    #[test]
    fn a_signature_is_found_among_others_and_other_versions_are_ignored() {
        // As in the specification's multi-signature test: junk, a v2, the valid one.
        let list = format!(
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {SPEC_SIGNATURE} v1a,bm90IGEgc2lnbmF0dXJl"
        );
        let auth = webhooks(&[SPEC_SECRET]);
        let headers = signed_headers(SPEC_ID, SPEC_TIMESTAMP, &list);
        assert_eq!(
            callback(&auth, &headers, SPEC_BODY, at(SPEC_TIMESTAMP)),
            Ok(())
        );
    }

    #[test]
    fn a_wrong_partial_or_absent_v1_signature_is_invalid() {
        let auth = webhooks(&[SPEC_SECRET]);
        let now = at(SPEC_TIMESTAMP);
        for signature in [
            // The specification's "invalid signature": the last character changed.
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
            "v1,",
            &SPEC_SIGNATURE[..8],
            "v1,dawfeoifkpqwoekfpqoekf",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            &SPEC_SIGNATURE[3..],
        ] {
            let headers = signed_headers(SPEC_ID, SPEC_TIMESTAMP, signature);
            assert_eq!(
                callback(&auth, &headers, SPEC_BODY, now),
                Err(Reason::Invalid),
                "{signature:?}"
            );
        }
    }

    #[test]
    fn a_body_changed_by_one_byte_is_invalid() {
        let auth = webhooks(&[SPEC_SECRET]);
        let headers = signed_headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_SIGNATURE);
        let changed = SPEC_BODY.replace("2432232314", "2432232315");
        assert_eq!(
            callback(&auth, &headers, &changed, at(SPEC_TIMESTAMP)),
            Err(Reason::Invalid)
        );
        // So is another id or timestamp with the same signature.
        let other_id = signed_headers(
            "msg_p5jXN8AQM9LWM0D4loKWxJel",
            SPEC_TIMESTAMP,
            SPEC_SIGNATURE,
        );
        assert_eq!(
            callback(&auth, &other_id, SPEC_BODY, at(SPEC_TIMESTAMP)),
            Err(Reason::Invalid)
        );
        let other_time = signed_headers(SPEC_ID, SPEC_TIMESTAMP + 1, SPEC_SIGNATURE);
        assert_eq!(
            callback(&auth, &other_time, SPEC_BODY, at(SPEC_TIMESTAMP)),
            Err(Reason::Invalid)
        );
    }

    #[test]
    fn each_missing_header_is_missing_and_a_bad_timestamp_invalid() {
        let auth = webhooks(&[SPEC_SECRET]);
        let now = at(SPEC_TIMESTAMP);
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let mut headers = signed_headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_SIGNATURE);
            headers.remove(name);
            let rejection = auth.check_callback(&headers, now).unwrap_err();
            assert_eq!(rejection.reason, Reason::Missing, "{name}");
            assert!(rejection.message.contains(name), "{rejection:?}");
            assert_eq!(rejection.challenge, WEBHOOK_CHALLENGE);
        }
        let mut headers = signed_headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_SIGNATURE);
        headers.insert("webhook-timestamp", HeaderValue::from_static("hello"));
        assert_eq!(
            callback(&auth, &headers, SPEC_BODY, now),
            Err(Reason::Invalid)
        );
        headers.insert(
            "webhook-timestamp",
            HeaderValue::from_static("1614265330.5"),
        );
        assert_eq!(
            callback(&auth, &headers, SPEC_BODY, now),
            Err(Reason::Invalid)
        );
        let long_id = "m".repeat(MAX_ID_BYTES + 1);
        let headers = signed_headers(&long_id, SPEC_TIMESTAMP, SPEC_SIGNATURE);
        assert_eq!(
            callback(&auth, &headers, SPEC_BODY, now),
            Err(Reason::Invalid)
        );
    }

    #[test]
    fn a_timestamp_past_the_tolerance_either_way_is_expired() {
        let auth = webhooks(&[SPEC_SECRET]);
        let headers = signed_headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_SIGNATURE);
        // The signature is checked only after the timestamp: these fail before it.
        for (now, way) in [
            (at(SPEC_TIMESTAMP + 301), "old"),
            (at(SPEC_TIMESTAMP - 301), "in the future"),
        ] {
            let rejection = auth.check_callback(&headers, now).unwrap_err();
            assert_eq!(rejection.reason, Reason::Expired);
            assert_eq!(
                rejection.message,
                format!("webhook-timestamp is 301 s {way}, outside the tolerance of 300 s")
            );
        }
        // At the edges of the tolerance the message is still accepted.
        let fresh = webhooks(&[SPEC_SECRET]);
        assert_eq!(
            callback(&fresh, &headers, SPEC_BODY, at(SPEC_TIMESTAMP + 300)),
            Ok(())
        );
        let fresh = webhooks(&[SPEC_SECRET]);
        assert_eq!(
            callback(&fresh, &headers, SPEC_BODY, at(SPEC_TIMESTAMP - 300)),
            Ok(())
        );
    }

    #[test]
    fn an_accepted_id_is_a_replay_until_its_window_ends() {
        let auth = webhooks(&[SPEC_SECRET]);
        let headers = signed_headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_SIGNATURE);
        assert_eq!(
            callback(&auth, &headers, SPEC_BODY, at(SPEC_TIMESTAMP)),
            Ok(())
        );
        let rejection = auth
            .check_callback(&headers, at(SPEC_TIMESTAMP + 10))
            .unwrap()
            .verify(SPEC_BODY.as_bytes())
            .unwrap_err();
        assert_eq!(rejection.reason, Reason::Replayed);
        assert!(rejection.message.contains(SPEC_ID), "{rejection:?}");
        assert_eq!(
            callback(&auth, &headers, SPEC_BODY, at(SPEC_TIMESTAMP + 300)),
            Err(Reason::Replayed),
            "the last second of the window"
        );

        // The same id re-signed later (a sender's retry) is a replay too, while remembered.
        let key = secret(SPEC_SECRET);
        let later = SPEC_TIMESTAMP + 200;
        let resent = signed_headers(
            SPEC_ID,
            later,
            &key.sign(SPEC_ID, later, SPEC_BODY.as_bytes()),
        );
        assert_eq!(
            callback(&auth, &resent, SPEC_BODY, at(later)),
            Err(Reason::Replayed)
        );
        // Once the first message's window is over, the id is forgotten.
        assert_eq!(
            callback(&auth, &resent, SPEC_BODY, at(SPEC_TIMESTAMP + 301)),
            Ok(())
        );
    }

    #[test]
    fn a_callback_not_kept_releases_its_id_for_a_retry() {
        let auth = webhooks(&[SPEC_SECRET]);
        let headers = signed_headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_SIGNATURE);
        let now = at(SPEC_TIMESTAMP);
        let admitted = auth
            .check_callback(&headers, now)
            .unwrap()
            .verify(SPEC_BODY.as_bytes())
            .unwrap();
        // While it is being recorded, the same message is a replay.
        assert_eq!(
            callback(&auth, &headers, SPEC_BODY, now),
            Err(Reason::Replayed)
        );
        // Recording failed (say, a 503): the id is free again.
        drop(admitted);
        assert_eq!(callback(&auth, &headers, SPEC_BODY, now), Ok(()));
        assert_eq!(
            callback(&auth, &headers, SPEC_BODY, now),
            Err(Reason::Replayed)
        );
    }

    #[test]
    fn the_oldest_ids_are_forgotten_past_the_capacity() {
        let auth = Auth::new(AuthConfig {
            mode: AuthMode::StandardWebhooks,
            webhook_secrets: vec![secret(SPEC_SECRET)],
            max_remembered_ids: 2,
            ..AuthConfig::default()
        });
        let key = secret(SPEC_SECRET);
        let now = at(SPEC_TIMESTAMP);
        let message = |id: &str| {
            signed_headers(
                id,
                SPEC_TIMESTAMP,
                &key.sign(id, SPEC_TIMESTAMP, SPEC_BODY.as_bytes()),
            )
        };
        for id in ["msg_1", "msg_2", "msg_3"] {
            assert_eq!(
                callback(&auth, &message(id), SPEC_BODY, now),
                Ok(()),
                "{id}"
            );
        }
        assert_eq!(
            callback(&auth, &message("msg_3"), SPEC_BODY, now),
            Err(Reason::Replayed)
        );
        assert_eq!(
            callback(&auth, &message("msg_2"), SPEC_BODY, now),
            Err(Reason::Replayed)
        );
        assert_eq!(
            callback(&auth, &message("msg_1"), SPEC_BODY, now),
            Ok(()),
            "the oldest was forgotten to make room"
        );
    }

    #[test]
    fn during_a_rotation_a_signature_by_either_secret_is_accepted() {
        let old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let new = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let auth = webhooks(&[old, new]);
        let now = at(SPEC_TIMESTAMP);
        for (n, key) in [old, new].into_iter().enumerate() {
            let id = format!("msg_rotation_{n}");
            let signature = secret(key).sign(&id, SPEC_TIMESTAMP, SPEC_BODY.as_bytes());
            let headers = signed_headers(&id, SPEC_TIMESTAMP, &signature);
            assert_eq!(callback(&auth, &headers, SPEC_BODY, now), Ok(()), "{key}");
        }
        // A sender signing with both during the switch is accepted too.
        let both = format!(
            "{} {}",
            secret(old).sign("msg_both", SPEC_TIMESTAMP, SPEC_BODY.as_bytes()),
            secret(new).sign("msg_both", SPEC_TIMESTAMP, SPEC_BODY.as_bytes())
        );
        let headers = signed_headers("msg_both", SPEC_TIMESTAMP, &both);
        assert_eq!(callback(&auth, &headers, SPEC_BODY, now), Ok(()));
        // A third secret is not.
        let stranger = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBrQ=");
        let signature = stranger.sign("msg_stranger", SPEC_TIMESTAMP, SPEC_BODY.as_bytes());
        let headers = signed_headers("msg_stranger", SPEC_TIMESTAMP, &signature);
        assert_eq!(
            callback(&auth, &headers, SPEC_BODY, now),
            Err(Reason::Invalid)
        );
    }

    #[test]
    fn bearer_keys_right_wrong_missing_or_malformed() {
        let auth = bearer(&["first-key", "second-key"]);
        let now = at(SPEC_TIMESTAMP);
        for good in [
            "Bearer first-key",
            "Bearer second-key",
            "bearer first-key",
            "BEARER  second-key",
        ] {
            assert_eq!(
                callback(&auth, &authorization(good), "{}", now),
                Ok(()),
                "{good}"
            );
            assert_eq!(auth.check_read(&authorization(good)), Ok(()), "{good}");
        }
        for (bad, reason) in [
            ("Bearer third-key", Reason::Invalid),
            ("Bearer first-ke", Reason::Invalid),
            ("Bearer ", Reason::Invalid),
            ("Basic Zmlyc3Qta2V5", Reason::Invalid),
            ("first-key", Reason::Invalid),
        ] {
            let rejection = auth.check_read(&authorization(bad)).unwrap_err();
            assert_eq!(rejection.reason, reason, "{bad}");
            assert_eq!(rejection.challenge, BEARER_CHALLENGE);
            assert!(
                !rejection.message.contains("-key"),
                "no key echoed: {rejection:?}"
            );
        }
        let rejection = auth.check_callback(&HeaderMap::new(), now).unwrap_err();
        assert_eq!(rejection.reason, Reason::Missing);
        assert!(rejection.message.contains("authorization"), "{rejection:?}");
    }

    #[test]
    fn reads_are_checked_with_bearer_keys_only_when_protected() {
        let auth = webhooks(&[SPEC_SECRET]);
        assert_eq!(auth.check_read(&authorization("Bearer reader")), Ok(()));
        let rejection = auth.check_read(&HeaderMap::new()).unwrap_err();
        assert_eq!(rejection.reason, Reason::Missing);
        assert_eq!(rejection.challenge, BEARER_CHALLENGE);

        let open = Auth::new(AuthConfig {
            mode: AuthMode::Bearer,
            api_keys: vec![ApiKey::new("k").unwrap()],
            protect_reads: false,
            ..AuthConfig::default()
        });
        assert_eq!(open.check_read(&HeaderMap::new()), Ok(()));
        assert_eq!(
            callback(&open, &HeaderMap::new(), "{}", at(0)),
            Err(Reason::Missing),
            "callbacks are still checked"
        );

        let none = Auth::new(AuthConfig::default());
        assert_eq!(none.check_read(&HeaderMap::new()), Ok(()));
        assert_eq!(callback(&none, &HeaderMap::new(), "{}", at(0)), Ok(()));
    }

    #[test]
    fn digests_compare_equal_only_when_every_byte_is() {
        let a = digest(b"a key");
        assert!(digests_equal(&a, &a.clone()));
        for at in [0, 15, 31] {
            let mut b = a;
            b[at] ^= 0x01;
            assert!(!digests_equal(&a, &b), "differs at byte {at}");
        }
        assert!(!digests_equal(&[0; 32], &[0xff; 32]));
        assert!(digests_equal(&[0; 32], &[0; 32]));
        assert_eq!(ApiKey::new("k").unwrap(), ApiKey::new("k").unwrap());
        assert_ne!(ApiKey::new("k").unwrap(), ApiKey::new("l").unwrap());
    }

    #[test]
    fn keys_and_secrets_are_checked_and_never_shown() {
        assert_eq!(ApiKey::new("").unwrap_err(), CredentialError::Empty);
        assert_eq!(
            ApiKey::new("a key").unwrap_err(),
            CredentialError::NotHeaderText
        );
        assert_eq!(
            ApiKey::new("clé").unwrap_err(),
            CredentialError::NotHeaderText
        );
        assert_eq!(
            WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            CredentialError::MissingPrefix
        );
        assert_eq!(
            WebhookSecret::parse("whsec_not base64!").unwrap_err(),
            CredentialError::NotBase64
        );
        assert_eq!(
            WebhookSecret::parse("whsec_c2hvcnQ=").unwrap_err(),
            CredentialError::Length(5)
        );
        assert_eq!(
            WebhookSecret::parse("").unwrap_err(),
            CredentialError::Empty
        );
        // Padding is optional, as in the reference libraries.
        assert_eq!(
            secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oDAQ"),
            secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oDAQ==")
        );

        let config = AuthConfig {
            mode: AuthMode::StandardWebhooks,
            api_keys: vec![ApiKey::new("top-secret-key").unwrap()],
            webhook_secrets: vec![secret(SPEC_SECRET)],
            ..AuthConfig::default()
        };
        let shown = format!("{config:?} {:?}", Auth::new(config.clone()));
        for hidden in ["top-secret-key", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] {
            assert!(!shown.contains(hidden), "{shown}");
        }
        assert!(shown.contains("***"), "{shown}");
    }
}
