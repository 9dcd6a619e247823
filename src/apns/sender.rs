//! The APNs edge: what the attempt loop needs of a connection pool. The
//! HTTP/2 client ([`ApnsClient`]) is the real one; the pipeline's unit tests
//! script answers through the same trait.

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{ApnsClient, ApnsResponse, Lane, PushRequest, SendError};
use crate::event::Environment;

/// Sends pushes to APNs. A rejected push is an `Ok` answer; `Err` means there
/// was no answer (see [`SendError`]).
pub trait ApnsSender: Send + Sync {
    /// Sends `req` to `env` on the connections of `lane`, waiting at most
    /// `timeout` (the time left before the ring deadline).
    fn send_on<'a>(
        &'a self,
        env: Environment,
        lane: Lane,
        req: &'a PushRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ApnsResponse, SendError>>;

    /// Drops `env`'s connections, so the next push opens a new one.
    fn reset(&self, env: Environment) -> BoxFuture<'_, ()>;
}

impl ApnsSender for ApnsClient {
    fn send_on<'a>(
        &'a self,
        env: Environment,
        lane: Lane,
        req: &'a PushRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<ApnsResponse, SendError>> {
        Box::pin(ApnsClient::send_on(self, env, lane, req, timeout))
    }

    fn reset(&self, env: Environment) -> BoxFuture<'_, ()> {
        Box::pin(ApnsClient::reset(self, env))
    }
}
