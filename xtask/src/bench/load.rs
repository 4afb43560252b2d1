//! The load generator's parts: callback bodies, one timed `POST /callback`, and an
//! open-loop schedule.
//!
//! Every client is HTTP/1.1 with keep-alive (reqwest pools connections per host; this
//! build has no HTTP/2), one connection per request in flight.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// Ids per callback, like the reference client's largest callbacks.
pub const IDS_PER_CALLBACK: usize = 200;

/// Wall-clock time in microseconds since the epoch: the service stamps `last_seen` with
/// the same clock, so the two compare.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// An HTTP/1.1 keep-alive client whose requests give up after `timeout`.
pub fn client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    tls::install_default_provider();
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()?)
}

/// A tiny xorshift generator: the load needs variety, not quality.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// What the reference client sends: 200 ids drawn from 0..=99 (so with repeats).
pub fn reference_ids(seed: u64) -> Vec<i64> {
    let mut next = xorshift(seed);
    (0..IDS_PER_CALLBACK)
        .map(|_| i64::try_from(next() % 100).unwrap_or(0))
        .collect()
}

/// The JSON body of a callback naming `ids`.
pub fn body(ids: impl IntoIterator<Item = i64>) -> String {
    let mut body = String::from("{\"object_ids\":[");
    for (n, id) in ids.into_iter().enumerate() {
        if n > 0 {
            body.push(',');
        }
        body.push_str(&id.to_string());
    }
    body.push_str("]}");
    body
}

/// How the service answered one callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `202 Accepted`: the ids are committed.
    Accepted,
    /// Any other status, e.g. `503` past the backlog limit.
    Refused(u16),
    /// No answer: connection error or client timeout.
    Failed,
}

/// One `POST /callback` with its times.
#[derive(Debug, Clone, Copy)]
pub struct Posted {
    pub answer: Answer,
    /// Wall-clock time the request was sent (µs since the epoch).
    pub sent_us: i64,
    /// Wall-clock time the whole answer was read (µs since the epoch).
    pub answered_us: i64,
    /// When the request was sent (monotonic: offsets into a phase for the plots).
    pub sent: Instant,
    /// Time from sending to reading the whole answer.
    pub latency: Duration,
}

/// Posts `body` to `url` and reads the whole answer.
pub async fn post(client: &reqwest::Client, url: &str, body: String) -> Posted {
    post_with(client, url, body, &Credentials::None).await
}

/// [`post`] with `credentials`; signing is part of the measured latency.
pub async fn post_with(
    client: &reqwest::Client,
    url: &str,
    body: String,
    credentials: &Credentials,
) -> Posted {
    let sent_us = now_micros();
    let started = Instant::now();
    let request = client.post(url).header("content-type", "application/json");
    let response = credentials
        .apply(request, body.as_bytes())
        .body(body)
        .send()
        .await;
    let answer = match response {
        Ok(response) => {
            let status = response.status().as_u16();
            match response.bytes().await {
                Ok(_) if status == 202 => Answer::Accepted,
                Ok(_) => Answer::Refused(status),
                Err(_) => Answer::Failed,
            }
        }
        Err(_) => Answer::Failed,
    };
    Posted {
        answer,
        sent_us,
        answered_us: now_micros(),
        sent: started,
        latency: started.elapsed(),
    }
}

/// How the service under load authenticates its callers (`--auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Auth {
    /// `auth.mode = "none"`, the default.
    #[default]
    None,
    /// `auth.mode = "bearer"`: every callback carries the bench's API key.
    Bearer,
    /// `auth.mode = "standard-webhooks"`: every callback is signed (its own `webhook-id`,
    /// the time of sending, an HMAC-SHA256 over its body).
    StandardWebhooks,
}

/// The bench's API key (loopback only).
const BENCH_API_KEY: &str = "callback-service-bench-key";
/// The bench's Standard Webhooks secret: 40 bytes (loopback only).
const BENCH_SECRET: &str = "whsec_Y2FsbGJhY2stc2VydmljZSBiZW5jaCBzZWNyZXQsIDQwIGJ5dGVzIQ==";

impl Auth {
    /// The service's `CALLBACK_AUTH__…` variables for this mode. Reads stay open
    /// (`auth.protect_reads = false`): they are the bench's own checks, not the load.
    pub fn service_env(self) -> Vec<(&'static str, String)> {
        let mode = match self {
            Auth::None => return Vec::new(),
            Auth::Bearer => "bearer",
            Auth::StandardWebhooks => "standard-webhooks",
        };
        vec![
            ("CALLBACK_AUTH__MODE", mode.to_owned()),
            ("CALLBACK_AUTH__API_KEYS", BENCH_API_KEY.to_owned()),
            ("CALLBACK_AUTH__WEBHOOK_SECRETS", BENCH_SECRET.to_owned()),
            ("CALLBACK_AUTH__PROTECT_READS", "false".to_owned()),
        ]
    }

    /// What the load generator sends for this mode.
    pub fn credentials(self) -> Credentials {
        match self {
            Auth::None => Credentials::None,
            Auth::Bearer => Credentials::Bearer(format!("Bearer {BENCH_API_KEY}")),
            Auth::StandardWebhooks => {
                use base64::Engine as _;
                use hmac::KeyInit as _;
                let encoded = BENCH_SECRET.trim_start_matches("whsec_");
                let key = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .expect("the bench secret is base64");
                Credentials::Webhook(Box::new(
                    hmac::Hmac::new_from_slice(&key).expect("HMAC takes any key size"),
                ))
            }
        }
    }
}

/// The credentials of every callback the load generator sends.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// None.
    None,
    /// The whole `Authorization` value.
    Bearer(String),
    /// The HMAC keyed with the secret, set up once and cloned per callback (a clone and
    /// one pass over a ~1 KB body, a few µs: signing is not what limits the load).
    Webhook(Box<hmac::Hmac<sha2::Sha256>>),
}

impl Credentials {
    /// `request` with the headers that authenticate `body`; the timestamp is the time of
    /// sending, so it is always inside the service's tolerance.
    pub fn apply(&self, request: reqwest::RequestBuilder, body: &[u8]) -> reqwest::RequestBuilder {
        use base64::Engine as _;
        use hmac::Mac as _;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        match self {
            Credentials::None => request,
            Credentials::Bearer(value) => request.header("authorization", value),
            Credentials::Webhook(keyed) => {
                let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = format!("msg_bench_{}_{n}", std::process::id());
                let timestamp = now_micros() / 1_000_000;
                let mut mac = (**keyed).clone();
                mac.update(format!("{id}.{timestamp}.").as_bytes());
                mac.update(body);
                let tag = mac.finalize().into_bytes();
                let signature = format!(
                    "v1,{}",
                    base64::engine::general_purpose::STANDARD.encode(tag)
                );
                request
                    .header("webhook-id", id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header("webhook-signature", signature)
            }
        }
    }
}

/// A background task (a poller, a sender) that stops when dropped, also on an early return.
#[derive(Debug)]
pub struct Background<T>(pub JoinHandle<T>);

impl<T> Background<T> {
    /// Runs `task` until it ends or the guard is dropped.
    pub fn spawn(task: impl Future<Output = T> + Send + 'static) -> Self
    where
        T: Send + 'static,
    {
        Self(tokio::spawn(task))
    }
}

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Locks a ledger shared by senders and pollers; a panicked holder leaves it usable.
pub fn lock<T>(shared: &Mutex<T>) -> MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What an open-loop run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenLoop {
    /// Sends due within the window.
    pub scheduled: u64,
    /// Sends dropped because `max_in_flight` requests were still waiting for answers.
    pub skipped: u64,
}

/// Starts `send(k)` at `per_second` evenly spaced times (k = 0, 1, …) during `window`,
/// whether or not earlier sends were answered (open loop), each on its own task; a send
/// that falls behind its time starts at once. At most `max_in_flight` run at a time: a send
/// due while all are busy is skipped and counted. Returns when every send has finished.
pub async fn open_loop<F, Fut>(
    per_second: f64,
    window: Duration,
    max_in_flight: usize,
    mut send: F,
) -> OpenLoop
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut done = OpenLoop::default();
    if per_second <= 0.0 || !per_second.is_finite() {
        return done;
    }
    let period = Duration::from_secs_f64(1.0 / per_second);
    let start = tokio::time::Instant::now();
    let end = start + window;
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut tasks = JoinSet::new();
    for k in 0_u64.. {
        let at = start + period.mul_f64(k as f64);
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at).await;
        while let Some(finished) = tasks.try_join_next() {
            resume_panic(finished);
        }
        done.scheduled += 1;
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                let request = send(k);
                tasks.spawn(async move {
                    request.await;
                    drop(permit);
                });
            }
            Err(_) => done.skipped += 1,
        }
    }
    while let Some(finished) = tasks.join_next().await {
        resume_panic(finished);
    }
    done
}

/// Lets a panic in a send task reach the caller instead of vanishing.
fn resume_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(err) = finished
        && err.is_panic()
    {
        std::panic::resume_unwind(err.into_panic());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_json_the_api_takes() {
        assert_eq!(body([1, 22, 333]), r#"{"object_ids":[1,22,333]}"#);
        assert_eq!(body([]), r#"{"object_ids":[]}"#);
        let ids = reference_ids(7);
        assert_eq!(ids.len(), 200);
        assert!(ids.iter().all(|id| (0..100).contains(id)));
        assert_eq!(ids, reference_ids(7), "a seed gives the same callback");
    }

    #[test]
    fn callbacks_are_signed_as_the_specification_says() {
        use base64::Engine as _;
        use hmac::{KeyInit as _, Mac as _};
        let body = br#"{"object_ids":[1]}"#;
        let http = client(Duration::from_secs(1)).unwrap();
        let request = Auth::StandardWebhooks
            .credentials()
            .apply(http.post("http://127.0.0.1:1/callback"), body)
            .build()
            .unwrap();
        let header = |name: &str| request.headers()[name].to_str().unwrap().to_owned();
        let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
        let key = base64::engine::general_purpose::STANDARD
            .decode(BENCH_SECRET.trim_start_matches("whsec_"))
            .unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(header("webhook-signature"), format!("v1,{expected}"));
        let again = Auth::StandardWebhooks
            .credentials()
            .apply(http.post("http://127.0.0.1:1/callback"), body)
            .build()
            .unwrap();
        assert_ne!(
            again.headers()["webhook-id"],
            id.as_str(),
            "an id per callback"
        );
        let sent: i64 = timestamp.parse().unwrap();
        assert!((now_micros() / 1_000_000 - sent).abs() <= 1);

        let bearer = Auth::Bearer
            .credentials()
            .apply(http.post("http://127.0.0.1:1/callback"), body)
            .build()
            .unwrap();
        assert_eq!(
            bearer.headers()["authorization"],
            "Bearer callback-service-bench-key"
        );
        assert!(Auth::None.service_env().is_empty());
        assert!(
            Auth::StandardWebhooks
                .service_env()
                .contains(&("CALLBACK_AUTH__MODE", "standard-webhooks".to_owned()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_sends_on_time_whatever_the_answers() {
        let started = tokio::time::Instant::now();
        let times = Arc::new(Mutex::new(Vec::new()));
        let done = open_loop(10.0, Duration::from_secs(1), 100, |k| {
            let times = Arc::clone(&times);
            async move {
                times.lock().unwrap().push((k, started.elapsed()));
                // Slow answers do not delay the next send.
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        })
        .await;
        assert_eq!(
            done,
            OpenLoop {
                scheduled: 10,
                skipped: 0
            }
        );
        let times = times.lock().unwrap().clone();
        let expected: Vec<(u64, Duration)> = (0..10)
            .map(|k| (k, Duration::from_millis(100 * k)))
            .collect();
        assert_eq!(times, expected);
        assert!(
            started.elapsed() >= Duration::from_millis(3_900),
            "returns once every send has finished"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_skips_sends_past_the_in_flight_cap() {
        let done = open_loop(10.0, Duration::from_secs(1), 3, |_| {
            tokio::time::sleep(Duration::from_secs(60))
        })
        .await;
        assert_eq!(
            done,
            OpenLoop {
                scheduled: 10,
                skipped: 7
            }
        );
    }
}
