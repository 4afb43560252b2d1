//! The callback emitter: every interval, one `POST {"object_ids":[…]}` of random ids to
//! callback-service; a little later, a look at what the service stored, reported as one
//! [`RoundReport`] per round. With credentials, every request carries the API key
//! (`Authorization: Bearer`) and every callback is signed as a Standard Webhook.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::EmitterSettings;
use crate::report::{PostOutcome, RoundReport};
use crate::signing::Credentials;

/// How many stored objects one `GET /objects` page asks for.
pub const PAGE_LIMIT: usize = 10_000;

/// The most pages read for one check: 100 pages of 10 000 ids.
const MAX_PAGES: usize = 100;

/// How long one `GET /objects` page may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer body read from the service; a longer one is not parsed.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Sends a callback every `settings.interval` until `shutdown` is cancelled or, when
/// `settings.rounds > 0`, until that many rounds have been sent and reported.
///
/// Each round runs in its own task, so a slow service or a late check never delays the
/// next callback. On shutdown, rounds still waiting for their check are dropped.
pub async fn run(
    settings: EmitterSettings,
    reports: mpsc::UnboundedSender<RoundReport>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tls::install_default_provider();
    let client = reqwest::Client::builder()
        .connect_timeout(settings.timeout)
        .no_proxy()
        .user_agent(concat!("client-service/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build the emitter's http client")?;
    let settings = Arc::new(settings);
    tracing::info!(target = %settings.target, interval = ?settings.interval, rounds = settings.rounds, "emitter started");

    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut rounds = JoinSet::new();
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => break,
        }
        while let Some(finished) = rounds.try_join_next() {
            log_panic(finished);
        }
        round += 1;
        let ids = random_ids(settings.max_ids, settings.id_max);
        let (client, round_settings, reports) =
            (client.clone(), Arc::clone(&settings), reports.clone());
        rounds.spawn(async move {
            let report = play_round(&client, &round_settings, round, ids).await;
            // The receiver is gone only when the program is stopping.
            let _ = reports.send(report);
        });
        if settings.rounds > 0 && round >= settings.rounds {
            tokio::select! {
                () = async {
                    while let Some(finished) = rounds.join_next().await {
                        log_panic(finished);
                    }
                } => {}
                () = shutdown.cancelled() => {}
            }
            break;
        }
    }
    let unfinished = rounds.len();
    rounds.shutdown().await;
    tracing::info!(rounds = round, unfinished, "emitter stopped");
    Ok(())
}

/// One round: POST the callback, wait until `report_delay` after sending, check the store.
async fn play_round(
    client: &reqwest::Client,
    settings: &EmitterSettings,
    round: u64,
    ids: Vec<u64>,
) -> RoundReport {
    let sent_at = Instant::now();
    let credentials = &settings.credentials;
    let post = post_callback(
        client,
        &settings.target,
        &ids,
        settings.timeout,
        credentials,
    )
    .await;
    let latency = sent_at.elapsed();
    tracing::debug!(round, ids = ids.len(), outcome = ?post, ?latency, "callback sent");
    tokio::time::sleep_until(sent_at + settings.report_delay).await;
    let stored = stored_ids(client, &settings.objects_url, credentials).await;
    if let Err(err) = &stored {
        tracing::debug!(round, error = %err, "cannot read what the service stored");
    }
    RoundReport::new(round, &ids, post, latency, stored.ok().as_ref())
}

/// `1..=max_ids` ids drawn from `0..=id_max`, duplicates possible.
pub fn random_ids(max_ids: usize, id_max: u64) -> Vec<u64> {
    let count = fastrand::usize(1..=max_ids.max(1));
    (0..count).map(|_| fastrand::u64(0..=id_max)).collect()
}

/// The callback body.
#[derive(Debug, Serialize)]
struct Callback<'a> {
    object_ids: &'a [u64],
}

/// The part of the service's `202` answer the report uses.
#[derive(Debug, Deserialize)]
struct AcceptedAnswer {
    accepted: Option<u64>,
    accepted_ids: Option<u64>,
    distinct: Option<u64>,
}

/// POSTs `ids` to `target`, with the credentials (a bearer key, Standard Webhooks headers
/// signing the exact body sent), and reads the answer.
async fn post_callback(
    client: &reqwest::Client,
    target: &Url,
    ids: &[u64],
    timeout: Duration,
    credentials: &Credentials,
) -> PostOutcome {
    let body = match serde_json::to_vec(&Callback { object_ids: ids }) {
        Ok(body) => body,
        Err(err) => {
            return PostOutcome::Failed {
                error: format!("cannot write the callback: {err}"),
            };
        }
    };
    let mut request = client
        .post(target.clone())
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(key) = &credentials.webhook_key {
        for (name, value) in key.headers(&body) {
            request = request.header(name, value);
        }
    }
    let response = with_api_key(request, credentials).body(body).send().await;
    let mut response = match response {
        Ok(response) => response,
        Err(err) => {
            return PostOutcome::Failed {
                error: describe(&err),
            };
        }
    };
    let status = response.status().as_u16();
    let body = match read_bounded(&mut response).await {
        Ok(body) => body,
        Err(error) => return PostOutcome::Failed { error },
    };
    let accepted = serde_json::from_slice::<AcceptedAnswer>(&body)
        .ok()
        .and_then(|answer| answer.accepted.or(answer.accepted_ids).or(answer.distinct));
    PostOutcome::Answered { status, accepted }
}

/// One page of the service's `GET /objects`.
#[derive(Debug, Deserialize)]
struct ObjectsPage {
    objects: Vec<ObjectEntry>,
}

#[derive(Debug, Deserialize)]
struct ObjectEntry {
    id: u64,
}

/// `request` with `Authorization: Bearer <api key>` when there is a key.
fn with_api_key(
    request: reqwest::RequestBuilder,
    credentials: &Credentials,
) -> reqwest::RequestBuilder {
    match &credentials.api_key {
        Some(key) => request.bearer_auth(key),
        None => request,
    }
}

/// Every id the service's `GET /objects` lists now, page after page.
async fn stored_ids(
    client: &reqwest::Client,
    objects_url: &Url,
    credentials: &Credentials,
) -> Result<HashSet<u64>, String> {
    let mut stored = HashSet::new();
    let mut after = None;
    for _ in 0..MAX_PAGES {
        let mut url = objects_url.clone();
        {
            let mut query = url.query_pairs_mut();
            if let Some(after) = after {
                query.append_pair("after", &format!("{after}"));
            }
            query.append_pair("limit", &format!("{PAGE_LIMIT}"));
        }
        let response = with_api_key(client.get(url), credentials)
            .timeout(CHECK_TIMEOUT)
            .send()
            .await
            .map_err(|err| describe(&err))?;
        if !response.status().is_success() {
            return Err(format!(
                "GET /objects answered {}",
                response.status().as_u16()
            ));
        }
        let page: ObjectsPage = response
            .json()
            .await
            .map_err(|err| format!("unreadable GET /objects answer: {}", describe(&err)))?;
        let full = page.objects.len() >= PAGE_LIMIT;
        after = page.objects.last().map(|object| object.id);
        stored.extend(page.objects.into_iter().map(|object| object.id));
        if !full {
            return Ok(stored);
        }
    }
    Ok(stored)
}

/// Reads an answer body of at most [`MAX_ANSWER_BYTES`]; a longer one reads as empty.
async fn read_bounded(response: &mut reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|err| describe(&err))? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Ok(Vec::new());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A short cause for the report: `timed out`, `connection failed: …`, or the root cause.
fn describe(err: &reqwest::Error) -> String {
    let mut root: &dyn std::error::Error = err;
    while let Some(source) = root.source() {
        root = source;
    }
    if err.is_timeout() {
        "timed out".to_owned()
    } else if err.is_connect() {
        format!("connection failed: {root}")
    } else {
        root.to_string()
    }
}

fn log_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(err) = finished
        && err.is_panic()
    {
        tracing::error!(error = %err, "an emitter round panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_respect_both_bounds() {
        for _ in 0..1000 {
            let ids = random_ids(200, 99);
            assert!((1..=200).contains(&ids.len()));
            assert!(ids.iter().all(|id| *id <= 99));
        }
        assert_eq!(random_ids(1, 0), vec![0]);
        let lengths: HashSet<usize> = (0..2000).map(|_| random_ids(5, 9).len()).collect();
        assert_eq!(
            lengths,
            (1..=5).collect(),
            "every length 1..=max_ids occurs"
        );
    }
}
