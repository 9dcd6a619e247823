//! RabbitMQ and the worker's `/readyz`: reachable (over TLS when asked), topology
//! present, queues drained and consumed. Postgres is in `postgres.rs`.

use std::future::Future;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Check, Section};
use crate::config::{redact_url, AmqpConfig};
use crate::tls::amqp::is_tls;
use crate::tls::{error_chain, is_local, TlsFailure};

/// Runs `f` under `timeout`; a timeout becomes an `Err` naming the step.
pub(super) async fn within<T, E: std::fmt::Display>(
    timeout: Duration,
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "{what}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}

/// `rabbitmq.connect`, `rabbitmq.topology`, `rabbitmq.work_queue`, `rabbitmq.dead_letters`.
pub async fn rabbitmq(cfg: &AmqpConfig, timeout: Duration) -> Vec<Check> {
    let url = redact_url(&cfg.url);
    let connect = Check::new("rabbitmq.connect", Section::Rabbitmq, "RabbitMQ reachable");
    let topology = Check::new("rabbitmq.topology", Section::Rabbitmq, "topology present");
    let work = Check::new(
        "rabbitmq.work_queue",
        Section::Rabbitmq,
        format!("work queue {}", cfg.work_queue),
    );
    let dead = Check::new(
        "rabbitmq.dead_letters",
        Section::Rabbitmq,
        format!("dead letters {}", cfg.dead_letter_queue),
    );
    let tls = Check::new("rabbitmq.tls", Section::Rabbitmq, "RabbitMQ encryption");
    let host = crate::tls::amqp::host(&cfg.url);
    let connected = tokio::time::timeout(timeout, crate::amqp::connect(cfg, "doctor")).await;
    let conn = match connected {
        Ok(Ok(c)) => c,
        failed => {
            let (e, failure) = match failed {
                Ok(Err(e)) => (e.to_string(), TlsFailure::of(&error_chain(&e))),
                _ => (
                    format!("connect: no answer within {} ms", timeout.as_millis()),
                    None,
                ),
            };
            let (fix, tls) = match failure {
                Some(f) => {
                    let fix = f.fix("VPW__AMQP__CA_FILE", &host);
                    (fix.clone(), tls.fail(e.clone(), fix))
                }
                None => (
                    format!(
                        "start RabbitMQ, or set VPW__AMQP__URL to where it runs (now {url}); \
                         check the user, password and vhost (%2f is /)"
                    ),
                    tls.skip("no connection"),
                ),
            };
            return vec![
                connect.fail(e, fix),
                tls,
                topology.skip("no connection"),
                work.skip("no connection"),
                dead.skip("no connection"),
            ];
        }
    };
    let mut out = vec![connect.pass(url), tls_state(cfg, &host, tls)];

    // A passive declare of a missing object closes its channel, so each object is
    // asked on a channel of its own.
    let exchanges = [
        (
            &cfg.call_exchange,
            ExchangeKind::Topic,
            "VPW__AMQP__CALL_EXCHANGE",
        ),
        (
            &cfg.dead_letter_exchange,
            ExchangeKind::Fanout,
            "VPW__AMQP__DEAD_LETTER_EXCHANGE",
        ),
        (
            &cfg.results_exchange,
            ExchangeKind::Topic,
            "VPW__AMQP__RESULTS_EXCHANGE",
        ),
    ];
    let exchange_checks = exchanges.iter().map(|(name, kind, setting)| {
        let conn = &conn;
        async move {
            let r = within(timeout, "exchange", async {
                let ch = conn.create_channel().await?;
                let r = ch
                    .exchange_declare(
                        name.as_str().into(),
                        kind.clone(),
                        ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                if r.is_ok() {
                    let _ = ch.close(200, "done".into()).await;
                }
                r
            })
            .await;
            r.err()
                .map(|e| format!("exchange {name} ({setting}): {}", short(&e)))
        }
    });
    let queue_probe = |name: &String| {
        let conn = &conn;
        let name = name.clone();
        async move {
            within(timeout, "queue", async {
                let ch = conn.create_channel().await?;
                let q = ch
                    .queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                let _ = ch.close(200, "done".into()).await;
                Ok::<_, lapin::Error>((q.message_count(), q.consumer_count()))
            })
            .await
        }
    };
    let (missing_exchanges, work_q, dead_q, cancel_q) = tokio::join!(
        futures_util::future::join_all(exchange_checks),
        queue_probe(&cfg.work_queue),
        queue_probe(&cfg.dead_letter_queue),
        queue_probe(&cfg.cancel_queue),
    );
    let mut missing: Vec<String> = missing_exchanges.into_iter().flatten().collect();
    if let Err(e) = &work_q {
        missing.push(format!(
            "queue {} (VPW__AMQP__WORK_QUEUE): {}",
            cfg.work_queue,
            short(e)
        ));
    }
    if let Err(e) = &cancel_q {
        missing.push(format!(
            "queue {} (VPW__AMQP__CANCEL_QUEUE): {}",
            cfg.cancel_queue,
            short(e)
        ));
    }
    if let Err(e) = &dead_q {
        missing.push(format!(
            "queue {} (VPW__AMQP__DEAD_LETTER_QUEUE): {}",
            cfg.dead_letter_queue,
            short(e)
        ));
    }
    out.push(if missing.is_empty() {
        topology.pass("3 exchanges, 3 queues")
    } else {
        topology.fail(
            format!("missing: {}", missing.join("; ")),
            "start the worker once (`voip-push-worker run` declares the topology), or \
             make the VPW__AMQP__* names match the ones producers and workers use",
        )
    });
    out.push(match work_q {
        Ok((messages, consumers)) => {
            let detail = format!(
                "{messages} waiting, {consumers} consumer{}",
                if consumers == 1 { "" } else { "s" }
            );
            let c = work.with_data(serde_json::json!({
                "messages": messages, "consumers": consumers,
            }));
            if consumers == 0 {
                c.warn(
                    detail,
                    "no worker consumes this queue, so calls wait here: start \
                     `voip-push-worker run` with the same VPW__AMQP__WORK_QUEUE",
                )
            } else {
                c.pass(detail)
            }
        }
        Err(_) => work.skip("queue missing (see above)"),
    });
    out.push(match dead_q {
        Ok((messages, _)) => {
            let c = dead.with_data(serde_json::json!({ "messages": messages }));
            if messages > 0 {
                c.warn(
                    format!(
                        "{messages} refused event{}",
                        if messages == 1 { "" } else { "s" }
                    ),
                    format!(
                        "producers sent events the worker could not read; each carries \
                         headers x-vpw-reason and x-vpw-error (RabbitMQ management UI, \
                         Queues, {}, Get messages)",
                        cfg.dead_letter_queue
                    ),
                )
            } else {
                c.pass("empty")
            }
        }
        Err(_) => dead.skip("queue missing (see above)"),
    });
    close(conn).await;
    out
}

/// `rabbitmq.tls`: `amqps://` always verifies the chain and the host name (a
/// connection that got this far passed both); plaintext is worth a warning
/// across a network.
fn tls_state(cfg: &AmqpConfig, host: &str, c: Check) -> Check {
    let encrypted = is_tls(&cfg.url);
    let c = c.with_data(serde_json::json!({
        "encrypted": encrypted,
        "verification": if encrypted { "full" } else { "off" },
    }));
    if encrypted {
        let roots = match &cfg.ca_file {
            Some(f) => format!("public CAs and {}", f.display()),
            None => "public CAs".into(),
        };
        c.pass(format!(
            "encrypted, certificate and host name verified ({roots})"
        ))
    } else if is_local(host) {
        c.pass("not encrypted (broker on this machine)")
    } else {
        c.warn(
            "not encrypted",
            "the connection to RabbitMQ is in plaintext: use amqps:// (the broker's TLS \
             listener, usually port 5671), with VPW__AMQP__CA_FILE for a private CA",
        )
    }
}

async fn close(conn: Connection) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        conn.close(200, "doctor done".into()),
    )
    .await;
}

/// A broker refusal without lapin's wrapping: "NOT_FOUND - no exchange 'x' in vhost '/'".
fn short(e: &str) -> String {
    if e.contains("NOT_FOUND") || e.contains("404") {
        "not found".into()
    } else {
        e.to_string()
    }
}

/// GET `path` of a worker at `authority` (HOST:PORT): the whole answer, head
/// and body, up to `limit` bytes.
pub(super) async fn http_get(
    authority: &str,
    path: &str,
    limit: u64,
    timeout: Duration,
) -> Result<String, String> {
    within(timeout, &format!("GET {path}"), async {
        let mut s = tokio::net::TcpStream::connect(authority).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.take(limit).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    })
    .await
}

/// `worker.readyz`: GET `/readyz` of a running worker.
pub async fn readyz(url: &str, timeout: Duration) -> Check {
    let c = Check::new("worker.readyz", Section::Worker, "worker /readyz");
    let authority = url
        .strip_prefix("http://")
        .unwrap_or(url)
        .trim_end_matches('/');
    if url.starts_with("https://") || authority.contains('/') || authority.is_empty() {
        return c.fail(
            format!("{url:?} is not http://HOST:PORT"),
            "pass --url http://HOST:PORT, the worker's VPW__HTTP__LISTEN address",
        );
    }
    // /readyz answers a line; 16 KiB is more than any answer of ours.
    let result = http_get(authority, "/readyz", 16 * 1024, timeout).await;
    let text = match result {
        Ok(t) => t,
        Err(e) => {
            return c.fail(
                format!("{authority}: {e}"),
                format!(
                    "no worker answers at {authority}: start `voip-push-worker run`, or pass \
                     the address of its VPW__HTTP__LISTEN"
                ),
            )
        }
    };
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    match status {
        200 => c.pass(format!("{authority}: {body}")),
        503 => c.fail(
            format!("{authority}: 503 {body}"),
            "the worker runs but is not ready: the RabbitMQ and Postgres checks above say \
             which one it cannot reach from here; if they pass, compare its VPW__AMQP__URL \
             and VPW__POSTGRES__URL with this shell's",
        ),
        _ => c.fail(
            format!("{authority}: answered {status}"),
            "this address is not a voip-push-worker: pass its VPW__HTTP__LISTEN address",
        ),
    }
}
