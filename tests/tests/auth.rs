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

        let mut command = tokio::process::Command::new(&tests::bins().client_service);
        command
            .current_dir(service.dir())
            .args(["--no-upstream", "--target", &service.url("/callback")])
            .args(["--interval-ms", "200", "--rounds", "2"])
            .env("CLIENT_EMITTER__WEBHOOK_SECRET", SECRET)
            .env("CLIENT_EMITTER__API_KEY", API_KEY)
            .env("CLIENT_EMITTER__REPORT_DELAY_MS", "500")
            .env("RUST_LOG", "info");
        let mut client = tests::Process::spawn(command)?;
        let exit = client.wait(WAIT).await?;
        assert_eq!(exit.code(), Some(0), "{}", client.lines().join("\n"));
        let reports: Vec<String> = client
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("round="))
            .collect();
        assert_eq!(reports.len(), 2, "{reports:?}");
        for report in &reports {
            assert!(report.contains("status=202"), "{report}");
            let stored = report
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("stored_even="))
                .expect("stored_even in the report");
            let (seen, sent) = stored.split_once('/').expect("stored_even=N/M");
            assert_eq!(seen, sent, "every even id sent is stored: {report}");
        }

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
        for line in service.process.lines().iter().chain(&client.lines()) {
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
