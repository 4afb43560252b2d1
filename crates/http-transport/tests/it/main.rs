//! End-to-end tests of the HTTP layer: a real server over the domain's fakes, real TCP.

mod admin;
mod auth;
mod callback;
mod hostile;
mod objects;
mod routing;
mod server;
mod support;
