//! The credentials the emitter sends: a bearer API key, and Standard Webhooks signatures
//! (<https://www.standardwebhooks.com>) over each callback.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

/// A Standard Webhooks signing key, decoded from `whsec_<base64>`.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookKey(Vec<u8>);

impl WebhookKey {
    /// Reads `whsec_<base64>`; the error never shows the secret.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let encoded = text
            .strip_prefix("whsec_")
            .ok_or("must start with whsec_")?;
        // Padding optional, as the specification's libraries read secrets.
        let padded = format!("{encoded}{}", "=".repeat((4 - encoded.len() % 4) % 4));
        let key = STANDARD
            .decode(padded)
            .map_err(|_| "must be base64 after whsec_")?;
        if !(24..=64).contains(&key.len()) {
            return Err("must decode to 24 to 64 bytes");
        }
        Ok(Self(key))
    }

    /// The `v1,<base64>` signature of `{id}.{timestamp}.{body}` (HMAC-SHA256).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key size");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// The three Standard Webhooks headers of one send of `body`: a fresh `webhook-id`,
    /// the time now and the signature.
    pub fn headers(&self, body: &[u8]) -> [(&'static str, String); 3] {
        let id = format!("msg_{:032x}", fastrand::u128(..));
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            });
        let signature = self.sign(&id, timestamp, body);
        [
            ("webhook-id", id),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ]
    }
}

impl fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookKey(***)")
    }
}

/// What the emitter proves itself with; either, both or neither.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Sent as `Authorization: Bearer …` on every request (callbacks and reads).
    pub api_key: Option<String>,
    /// Signs every callback.
    pub webhook_key: Option<WebhookKey>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("webhook_key", &self.webhook_key)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_specifications_examples() {
        let key = WebhookKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let key = WebhookKey::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            key.sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1_649_367_553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn every_send_gets_a_fresh_id_and_its_own_signature() {
        let key = WebhookKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let [(_, first), (_, timestamp), (_, signature)] = key.headers(b"{}");
        let [(_, second), ..] = key.headers(b"{}");
        assert_ne!(first, second);
        assert!(first.starts_with("msg_"), "{first}");
        let timestamp: i64 = timestamp.parse().unwrap();
        assert_eq!(signature, key.sign(&first, timestamp, b"{}"));
    }

    #[test]
    fn bad_secrets_are_refused_without_being_shown() {
        assert_eq!(
            WebhookKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err("must start with whsec_")
        );
        assert_eq!(
            WebhookKey::parse("whsec_!!"),
            Err("must be base64 after whsec_")
        );
        assert_eq!(
            WebhookKey::parse("whsec_c2hvcnQ"),
            Err("must decode to 24 to 64 bytes")
        );
        let credentials = Credentials {
            api_key: Some("top-secret".to_owned()),
            webhook_key: WebhookKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").ok(),
        };
        let shown = format!("{credentials:?}");
        assert!(
            !shown.contains("top-secret") && shown.contains("***"),
            "{shown}"
        );
    }
}
