//! Unknown paths and wrong methods.

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;

use crate::support::{TestServer, request};

#[tokio::test]
async fn a_known_path_with_a_wrong_method_is_405_with_allow() {
    let server = TestServer::start().await;
    for (method, path, allow) in [
        (Method::GET, "/callback", "POST"),
        (Method::PUT, "/callback", "POST"),
        (Method::POST, "/objects", "GET"),
        (Method::DELETE, "/objects/1", "GET"),
        (Method::POST, "/", "GET"),
    ] {
        let reply = server
            .send(request(
                method.clone(),
                path,
                Some("application/json"),
                "{}",
            ))
            .await;
        reply.assert_error(405, "method_not_allowed");
        assert_eq!(reply.headers[header::ALLOW], allow, "{method} {path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn head_is_method_not_allowed() {
    let server = TestServer::start().await;
    let req = Request::builder()
        .method(Method::HEAD)
        .uri(format!("http://{}/", server.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let response = crate::support::within("HEAD /", client.request(req))
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()[header::ALLOW], "GET");
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_path_is_404() {
    let server = TestServer::start().await;
    for path in ["/nope", "/objects/", "/objects/1/extra", "/callback/x"] {
        let reply = server.get(path).await;
        let message = reply.assert_error(404, "not_found");
        assert!(message.contains(path), "{path}: {message}");
    }
    server.stop().await;
}
