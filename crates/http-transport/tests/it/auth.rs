//! Authenticated callers, through the real router over the domain's fakes: every rejection
//! is a `401` with the envelope and a `WWW-Authenticate` challenge and records nothing; an
//! authenticated callback is accepted and recorded; protected reads need a bearer key.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::Full;
use http_transport::{ApiKey, AuthConfig, AuthMode, HttpConfig, WebhookSecret};
use serde_json::json;

use crate::support::{Options, Reply, TestServer, request};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const API_KEY: &str = "reader-key-1";

const BEARER: &str = r#"Bearer realm="callback-service""#;
const WEBHOOK: &str = r#"Webhook realm="callback-service""#;

fn server_with(auth: AuthConfig) -> Options {
    Options {
        http: HttpConfig {
            auth,
            ..HttpConfig::default()
        },
        ..Options::default()
    }
}

fn webhooks() -> AuthConfig {
    AuthConfig {
        mode: AuthMode::StandardWebhooks,
        webhook_secrets: vec![WebhookSecret::parse(SECRET).unwrap()],
        api_keys: vec![ApiKey::new(API_KEY).unwrap()],
        ..AuthConfig::default()
    }
}

fn bearer() -> AuthConfig {
    AuthConfig {
        mode: AuthMode::Bearer,
        api_keys: vec![ApiKey::new(API_KEY).unwrap()],
        ..AuthConfig::default()
    }
}

fn now_secs() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since.as_secs()).unwrap()
}

/// `POST /callback` with `body`, its Standard Webhooks headers signed by `secret` over
/// `signed_body`.
fn signed(
    id: &str,
    timestamp: i64,
    secret: &str,
    signed_body: &str,
    body: &str,
) -> Request<Full<Bytes>> {
    let signature =
        WebhookSecret::parse(secret)
            .unwrap()
            .sign(id, timestamp, signed_body.as_bytes());
    let mut req = request(Method::POST, "/callback", Some("application/json"), body);
    let headers = req.headers_mut();
    headers.insert("webhook-id", HeaderValue::from_str(id).unwrap());
    headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
    headers.insert(
        "webhook-signature",
        HeaderValue::from_str(&signature).unwrap(),
    );
    req
}

/// `req` with `Authorization: Bearer key`.
fn with_key(mut req: Request<Full<Bytes>>, key: &str) -> Request<Full<Bytes>> {
    req.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    req
}

#[track_caller]
fn assert_unauthorized(reply: &Reply, challenge: &str, mention: &str) {
    let message = reply.assert_error(401, "unauthorized");
    assert!(message.contains(mention), "{mention:?} in {message:?}");
    assert_eq!(
        reply.headers[header::WWW_AUTHENTICATE],
        challenge,
        "{reply:?}"
    );
    for secret in [SECRET, OTHER_SECRET, API_KEY] {
        assert!(!message.contains(secret), "a secret in {message:?}");
    }
}

#[track_caller]
fn assert_nothing_recorded(server: &TestServer) {
    assert_eq!(server.store.enqueue_sizes(), Vec::<usize>::new());
    assert_eq!(server.store.inbox_len(), 0);
}

#[tokio::test]
async fn unsigned_badly_signed_stale_and_altered_callbacks_are_401_and_record_nothing() {
    let server = TestServer::start_with(server_with(webhooks())).await;
    let body = r#"{"object_ids":[1,2,3]}"#;
    let now = now_secs();

    let unsigned = server.callback(body).await;
    assert_unauthorized(&unsigned, WEBHOOK, "missing webhook-id header");
    // Authentication comes first: no hint about the content type either.
    let text = request(Method::POST, "/callback", Some("text/plain"), body);
    assert_unauthorized(&server.send(text).await, WEBHOOK, "missing webhook-id");
    let cases = [
        (
            signed("msg_a", now, OTHER_SECRET, body, body),
            "no signature in webhook-signature matches",
        ),
        (
            signed("msg_b", now - 301, SECRET, body, body),
            "s old, outside the tolerance of 300 s",
        ),
        (
            signed("msg_c", now + 301, SECRET, body, body),
            "s in the future, outside the tolerance of 300 s",
        ),
        (
            signed("msg_d", now, SECRET, body, r#"{"object_ids":[1,2,4]}"#),
            "no signature in webhook-signature matches",
        ),
    ];
    for (req, mention) in cases {
        assert_unauthorized(&server.send(req).await, WEBHOOK, mention);
    }
    let mut bad_timestamp = signed("msg_e", now, SECRET, body, body);
    bad_timestamp
        .headers_mut()
        .insert("webhook-timestamp", HeaderValue::from_static("yesterday"));
    assert_unauthorized(
        &server.send(bad_timestamp).await,
        WEBHOOK,
        "webhook-timestamp must be whole seconds",
    );
    assert_nothing_recorded(&server);
    let stats = server.admin_get("/stats").await;
    assert_eq!(stats.json["accepted_callbacks"], 0, "{stats:?}");

    let accepted = server.send(signed("msg_ok", now, SECRET, body, body)).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{accepted:?}");
    assert_eq!(accepted.json, json!({ "accepted": 3 }));
    assert_eq!(server.store.enqueue_sizes(), vec![3]);

    let replayed = server.send(signed("msg_ok", now, SECRET, body, body)).await;
    assert_unauthorized(
        &replayed,
        WEBHOOK,
        r#"webhook-id "msg_ok" was accepted already"#,
    );
    assert_eq!(
        server.store.enqueue_sizes(),
        vec![3],
        "the replay recorded nothing"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_signed_callback_refused_for_its_body_can_be_sent_again_with_its_id() {
    let server = TestServer::start_with(server_with(webhooks())).await;
    let now = now_secs();
    let broken = r#"{"object_ids":[1,"#;
    let reply = server
        .send(signed("msg_retry", now, SECRET, broken, broken))
        .await;
    reply.assert_error(400, "invalid_json");
    assert_nothing_recorded(&server);

    let fixed = r#"{"object_ids":[7]}"#;
    let reply = server
        .send(signed("msg_retry", now, SECRET, fixed, fixed))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_eq!(server.store.enqueue_sizes(), vec![1]);
    server.stop().await;
}

#[tokio::test]
async fn bearer_keys_guard_callbacks_and_reads_but_not_health_or_admin() {
    let server = TestServer::start_with(server_with(bearer())).await;
    server.seed(4).await;
    let body = r#"{"object_ids":[5,6]}"#;
    let callback = || request(Method::POST, "/callback", Some("application/json"), body);

    assert_unauthorized(
        &server.send(callback()).await,
        BEARER,
        "missing authorization header",
    );
    assert_unauthorized(
        &server.send(with_key(callback(), "not-the-key")).await,
        BEARER,
        "the api key is not accepted",
    );
    let mut basic = callback();
    basic.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Basic cmVhZGVyLWtleS0xOg=="),
    );
    assert_unauthorized(
        &server.send(basic).await,
        BEARER,
        "must be `Bearer <api key>`",
    );
    assert_nothing_recorded(&server);

    let accepted = server.send(with_key(callback(), API_KEY)).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{accepted:?}");
    assert_eq!(server.store.enqueue_sizes(), vec![2]);

    for path in ["/objects", "/objects/4"] {
        let without = server.get(path).await;
        assert_unauthorized(&without, BEARER, "missing authorization header");
        let with = server
            .send(with_key(request(Method::GET, path, None, ""), API_KEY))
            .await;
        assert_eq!(with.status, StatusCode::OK, "{path}: {with:?}");
    }
    assert_eq!(
        server.get("/").await.status,
        StatusCode::OK,
        "health is open"
    );
    assert_eq!(
        server.admin_get("/stats").await.status,
        StatusCode::OK,
        "the admin listener is open"
    );
    server.stop().await;
}

#[tokio::test]
async fn reads_under_standard_webhooks_take_a_bearer_key_unless_left_open() {
    let server = TestServer::start_with(server_with(webhooks())).await;
    server.seed(8).await;
    let without = server.get("/objects/8").await;
    assert_unauthorized(&without, BEARER, "missing authorization header");
    let with = server
        .send(with_key(
            request(Method::GET, "/objects/8", None, ""),
            API_KEY,
        ))
        .await;
    assert_eq!(with.status, StatusCode::OK, "{with:?}");
    assert_eq!(with.json["id"], 8);
    // A bearer key is no way around a callback's signature.
    let keyed = with_key(
        request(
            Method::POST,
            "/callback",
            Some("application/json"),
            r#"{"object_ids":[1]}"#,
        ),
        API_KEY,
    );
    assert_unauthorized(&server.send(keyed).await, WEBHOOK, "missing webhook-id");
    server.stop().await;

    let open = TestServer::start_with(server_with(AuthConfig {
        protect_reads: false,
        ..webhooks()
    }))
    .await;
    open.seed(8).await;
    assert_eq!(open.get("/objects/8").await.status, StatusCode::OK);
    assert_eq!(open.get("/objects").await.status, StatusCode::OK);
    open.stop().await;
}
