//! A request id and a tracing span for every RPC.
//!
//! The tower layer runs before the Flight service: it mints a [`RequestId`], stores it
//! in the request's extensions (where handlers and the error mapping find it) and runs
//! the call inside an `rpc` span carrying the id, the method and, once known, the
//! principal.

use std::fmt;
use std::task::{Context, Poll};

use tower::{Layer, Service};
use tracing::Instrument;

/// A short random id naming one RPC in logs and in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self(id[..16].to_string())
    }

    /// The id of a request (a fresh one if the layer did not run, e.g. in unit tests).
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<RequestId>()
            .cloned()
            .unwrap_or_default()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for RequestIdService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let id = RequestId::new();
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let span = tracing::info_span!(
            "rpc",
            request_id = %id,
            method = %method,
            principal = tracing::field::Empty,
        );
        req.extensions_mut().insert(id);
        self.inner.call(req).instrument(span)
    }
}
