//! End-to-end: `callback-service` with `auth.mode = "standard-webhooks"` and the real
//! `client-service` given the same secret (and a reader key): its signed callbacks are
//! stored; an unsigned one, and a read without the key, get `401`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use tests::{Backend, Service, Upstream, bounded, eventually, http};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const API_KEY: &str = "e2e-reader-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_callbacks_are_stored_and_unsigned_ones_refused() -> anyhow::Result<()> {
    bounded(Duration::from_secs(120), async {
        let upstream = Upstream::start(0, 5).await?;
        let service = Service::start(
            Backend::Sqlite,
            &upstream.base_url(),
            Duration::from_secs(60),
            &[
                ("CALLBACK_AUTH__MODE", "standard-webhooks"),
                ("CALLBACK_AUTH__WEBHOOK_SECRETS", SECRET),
                ("CALLBACK_AUTH__API_KEYS", API_KEY),
            ],
        )
        .await?
        .expect("SQLite is always available");

        let client_lines = tests::emit_two_rounds(
            &service,
            &[
                ("CLIENT_EMITTER__WEBHOOK_SECRET", SECRET),
                ("CLIENT_EMITTER__API_KEY", API_KEY),
                ("RUST_LOG", "info"),
            ],
            WAIT,
        )
        .await?;

        // An unsigned callback: refused, with the challenge, and nothing new recorded.
        let accepted_before = admin_stats(&service).await?["accepted_callbacks"].clone();
        let response = http()
            .post(service.url("/callback"))
            .header("content-type", "application/json")
            .body(r#"{"object_ids":[1000,1002]}"#)
            .send()
            .await?;
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Webhook realm="callback-service""#
        );
        let body: Value = response.json().await?;
        assert_eq!(body["error"], "unauthorized", "{body}");
        assert_eq!(
            admin_stats(&service).await?["accepted_callbacks"],
            accepted_before
        );

        // Reads take the bearer key.
        let without = http().get(service.url("/objects")).send().await?;
        assert_eq!(without.status(), 401);
        let with: Value = http()
            .get(service.url("/objects?limit=10000"))
            .bearer_auth(API_KEY)
            .send()
            .await?
            .json()
            .await?;
        let ids: BTreeSet<i64> = with["objects"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["id"].as_i64())
            .collect();
        assert!(
            !ids.is_empty() && ids.iter().all(|id| id % 2 == 0 && *id < 100),
            "{ids:?}"
        );

        // Counted by reason, once each (the unsigned callback, the read without a key).
        let missing = eventually(WAIT, Duration::from_millis(20), || async {
            let text = http()
                .get(service.admin_url("/metrics"))
                .send()
                .await?
                .text()
                .await?;
            Ok(text
                .lines()
                .find(|l| l.starts_with(r#"auth_rejections_total{reason="missing"}"#))
                .map(str::to_owned))
        })
        .await?;
        assert!(missing.ends_with(" 2"), "{missing}");

        // Neither the secret nor the key shows in either program's output.
        for line in service.process.lines().iter().chain(&client_lines) {
            assert!(
                !line.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") && !line.contains(API_KEY),
                "a secret in the output: {line}"
            );
        }
        Ok(())
    })
    .await
}

async fn admin_stats(service: &Service) -> anyhow::Result<Value> {
    Ok(http()
        .get(service.admin_url("/stats"))
        .send()
        .await?
        .json()
        .await?)
}
