//! What the driver runs on: a [`Source`] of sessions, each yielding
//! [`Delivery`]s it settles. `amqp::source` is RabbitMQ's.

use std::future::Future;

use super::Incoming;

/// What a source's failures are, to the driver: something to log before it
/// reconnects (or, for a settlement, before the broker delivers again).
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Where a lane's messages come from (a queue): each [`open`](Source::open) is
/// one session, connected, its topology declared, consuming.
pub trait Source: Send + Sync + 'static {
    type Session: Session;
    /// What it consumes, for logs.
    fn name(&self) -> &str;
    /// Starts a session with at most `prefetch` messages delivered and unsettled.
    fn open(
        &self,
        prefetch: u16,
    ) -> impl Future<Output = Result<Self::Session, SourceError>> + Send;
}

/// One connection's deliveries.
pub trait Session: Send {
    type Delivery: Delivery;
    /// The next delivery; `Err` when the session failed, `None` when the source
    /// ended it. Either way the driver opens a new session.
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Delivery, SourceError>>> + Send;
    /// Takes no more deliveries (shutdown; what is in hand may still settle).
    fn stop(&mut self) -> impl Future<Output = ()> + Send;
    /// Ends the session: what is still unsettled returns to the queue.
    fn close(self, why: &'static str) -> impl Future<Output = ()> + Send;
}

/// One message from a source. Each way of settling it takes it by value, so it
/// is settled at most once; the driver settles every one it handles.
pub trait Delivery: Send + Sync + 'static {
    /// The message, its claims owned by `claim_owner`.
    fn incoming(&self, claim_owner: String) -> Incoming;
    fn ack(self) -> impl Future<Output = Result<(), SourceError>> + Send;
    /// Back to the queue, for another worker.
    fn requeue(self) -> impl Future<Output = Result<(), SourceError>> + Send;
    /// To the lane's dead-letter queue with `reason` (a closed set) and `detail`,
    /// or, when that cannot be done, to whatever the source does with a rejected
    /// message.
    fn dead_letter(
        self,
        reason: &'static str,
        detail: &str,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}
