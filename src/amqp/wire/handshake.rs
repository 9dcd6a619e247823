//! Opening a connection: TCP (TLS for `amqps://`), the protocol header,
//! `connection.start`/`tune`/`open` with PLAIN credentials, then the
//! channel's own setup, all before the reader and writer tasks start.

use std::sync::Arc;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use amq_protocol::uri::{AMQPScheme, AMQPUri};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::frames::{method, read_frame, write_frames};
use super::WireError;
use crate::config::AmqpConfig;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// An open connection before its tasks start: the stream's halves, what was
/// read beyond the last frame, and the heartbeat agreed (seconds, 0: none).
pub struct Opened {
    pub rd: Reader,
    pub wr: Writer,
    pub inbuf: BytesMut,
    pub heartbeat: u16,
    /// The largest frame agreed: longer bodies go in several frames.
    pub frame_max: u32,
}

impl Opened {
    /// Sends `frames`, then reads the next method frame on `channel` and
    /// returns it if `want` takes it.
    pub async fn call<T>(
        &mut self,
        frames: &[AMQPFrame],
        what: &str,
        want: impl Fn(AMQPClass) -> Option<T>,
    ) -> Result<T, WireError> {
        write_frames(&mut self.wr, frames).await?;
        self.expect(what, want).await
    }

    pub async fn expect<T>(
        &mut self,
        what: &str,
        want: impl Fn(AMQPClass) -> Option<T>,
    ) -> Result<T, WireError> {
        loop {
            match read_frame(&mut self.rd, &mut self.inbuf).await? {
                AMQPFrame::Heartbeat => continue,
                AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    return Err(WireError::Closed(format!(
                        "{} {}",
                        c.reply_code, c.reply_text
                    )))
                }
                AMQPFrame::Method(
                    _,
                    AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Close(c)),
                ) => {
                    return Err(WireError::Closed(format!(
                        "{} {}",
                        c.reply_code, c.reply_text
                    )))
                }
                AMQPFrame::Method(_, class) => {
                    let shown = format!("{class:?}");
                    return want(class).ok_or_else(|| {
                        WireError::Protocol(format!("expected {what}, got {shown}"))
                    });
                }
                other => {
                    return Err(WireError::Protocol(format!(
                        "expected {what}, got {other:?}"
                    )))
                }
            }
        }
    }
}

/// Connects to `cfg.url` as `name` (what `rabbitmqctl list_connections` shows).
pub async fn open(cfg: &AmqpConfig, name: &str) -> Result<Opened, WireError> {
    let uri: AMQPUri = cfg.url.parse().map_err(WireError::Url)?;
    let host = uri.authority.host.clone();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), uri.authority.port)).await?;
    tcp.set_nodelay(true)?;
    let (rd, wr): (Reader, Writer) = match uri.scheme {
        AMQPScheme::AMQP => {
            let (r, w) = tcp.into_split();
            (Box::new(r), Box::new(w))
        }
        AMQPScheme::AMQPS => {
            let config = crate::tls::amqp::rustls_config(cfg).map_err(WireError::Tls)?;
            let server = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| WireError::Tls(format!("{host}: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server, tcp)
                .await?;
            let (r, w) = tokio::io::split(tls);
            (Box::new(r), Box::new(w))
        }
    };
    let mut o = Opened {
        rd,
        wr,
        inbuf: BytesMut::with_capacity(64 * 1024),
        heartbeat: 0,
        frame_max: 0,
    };
    o.wr.write_all(b"AMQP\x00\x00\x09\x01").await?;
    o.expect("connection.start", |c| match c {
        AMQPClass::Connection(connection::AMQPMethod::Start(s)) => Some(s),
        _ => None,
    })
    .await?;
    let user = &uri.authority.userinfo;
    let start_ok = connection::StartOk {
        client_properties: client_properties(name),
        mechanism: ShortString::from("PLAIN"),
        response: LongString::from(format!("\0{}\0{}", user.username, user.password)),
        locale: ShortString::from("en_US"),
    };
    let tune = o
        .call(
            &[method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
            )],
            "connection.tune",
            |c| match c {
                AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => Some(t),
                _ => None,
            },
        )
        .await
        .map_err(|e| match e {
            // RabbitMQ closes the socket on bad credentials.
            WireError::Closed(_) => WireError::Closed(format!(
                "RabbitMQ refused the login of user {:?}",
                user.username
            )),
            e => e,
        })?;
    o.heartbeat = uri.query.heartbeat.unwrap_or(tune.heartbeat);
    // 0 is "no limit" from the broker; ours stays finite.
    o.frame_max = match uri.query.frame_max.unwrap_or(tune.frame_max) {
        0 => 131_072,
        n => n.max(4096),
    };
    let tune_ok = connection::TuneOk {
        channel_max: 8,
        frame_max: o.frame_max,
        heartbeat: o.heartbeat,
    };
    let open = connection::Open {
        virtual_host: ShortString::from(uri.vhost.clone()),
    };
    o.call(
        &[
            method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
            ),
            method(0, AMQPClass::Connection(connection::AMQPMethod::Open(open))),
        ],
        "connection.open-ok",
        |c| match c {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => Some(()),
            _ => None,
        },
    )
    .await?;
    Ok(o)
}

fn client_properties(name: &str) -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "consumer_cancel_notify",
        "connection.blocked",
        "basic.nack",
    ] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert("connection_name".into(), AMQPValue::LongString(name.into()));
    props.insert(
        "product".into(),
        AMQPValue::LongString("voip-push-worker".into()),
    );
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    props
}
