//! Postgres, RabbitMQ and the worker's `/readyz`: reachable, migrated, topology
//! present, queues drained and consumed.

use std::future::Future;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use super::{Check, Section};
use crate::config::{redact_url, AmqpConfig, Config};
use crate::store::migrate::{pending, MIGRATIONS};

/// Runs `f` under `timeout`; a timeout becomes an `Err` naming the step.
async fn within<T, E: std::fmt::Display>(
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

/// `postgres.connect`, `postgres.migrations`, `postgres.tokens`.
pub async fn postgres(cfg: &Config, timeout: Duration) -> Vec<Check> {
    let url = redact_url(&cfg.postgres.url);
    let connect = Check::new("postgres.connect", Section::Postgres, "Postgres reachable");
    let migrations = Check::new(
        "postgres.migrations",
        Section::Postgres,
        "migrations current",
    );
    let tokens = Check::new("postgres.tokens", Section::Postgres, "device tokens");
    let mut pg: tokio_postgres::Config = match cfg.postgres.url.parse() {
        Ok(c) => c,
        Err(e) => {
            return vec![
                connect.fail(
                    format!("{url}: {e}"),
                    "set VPW__POSTGRES__URL to postgres://USER[:PASSWORD]@HOST:PORT/DATABASE",
                ),
                migrations.skip("no connection"),
                tokens.skip("no connection"),
            ]
        }
    };
    pg.connect_timeout(timeout);
    pg.application_name("voip-push-worker doctor");
    let client = match tokio::time::timeout(timeout, pg.connect(NoTls)).await {
        Ok(Ok((client, conn))) => {
            tokio::spawn(conn);
            client
        }
        failed => {
            let (detail, fix) = match failed {
                Ok(Err(e)) => {
                    let fix = match e.code() {
                        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
                            "the database does not exist yet: run `voip-push-worker migrate` \
                             (it creates the database and its tables)"
                                .to_string()
                        }
                        Some(c)
                            if *c == SqlState::INVALID_PASSWORD
                                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
                        {
                            "Postgres refused the login: fix the user and password in \
                             VPW__POSTGRES__URL (or pg_hba.conf)"
                                .to_string()
                        }
                        _ => format!(
                            "start PostgreSQL, or set VPW__POSTGRES__URL to where it runs \
                             (now {url})"
                        ),
                    };
                    (format!("{url}: {}", pg_error(&e)), fix)
                }
                _ => (
                    format!("{url}: no answer within {} ms", timeout.as_millis()),
                    format!(
                        "a firewall drops traffic to Postgres, or the host in \
                         VPW__POSTGRES__URL is wrong (now {url})"
                    ),
                ),
            };
            return vec![
                connect.fail(detail, fix),
                migrations.skip("no connection"),
                tokens.skip("no connection"),
            ];
        }
    };
    let mut out = vec![connect.pass(url)];

    let pending = match within(timeout, "migrations", pending(&client)).await {
        Ok(p) => p,
        Err(e) => {
            out.push(migrations.fail(e, "run `voip-push-worker migrate`"));
            out.push(tokens.skip("migrations unknown"));
            return out;
        }
    };
    let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if pending.is_empty() {
        out.push(migrations.pass(format!("at version {latest}")));
    } else {
        let names: Vec<String> = MIGRATIONS
            .iter()
            .filter(|m| pending.contains(&m.0))
            .map(|m| format!("{} {}", m.0, m.1))
            .collect();
        out.push(
            migrations
                .fail(
                    format!("pending: {}", names.join(", ")),
                    "run `voip-push-worker migrate` against this database (the worker \
                     does not migrate by itself)",
                )
                .with_data(serde_json::json!({ "pending": pending })),
        );
        if pending.contains(&1) {
            out.push(tokens.skip("no devices table yet"));
            return out;
        }
    }
    out.push(token_counts(&client, cfg, tokens, timeout).await);
    out
}

/// The server's own message, not tokio-postgres' "db error" wrapper.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s = format!("{s}: {inner}");
                src = inner.source();
            }
            s
        }
    }
}

async fn token_counts(
    client: &tokio_postgres::Client,
    cfg: &Config,
    c: Check,
    timeout: Duration,
) -> Check {
    let rows = match within(
        timeout,
        "token counts",
        client.query(
            "SELECT bundle_id, environment,
                    count(*) FILTER (WHERE invalidated_at IS NULL),
                    count(*) FILTER (WHERE invalidated_at IS NOT NULL)
             FROM devices GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        ),
    )
    .await
    {
        Ok(rows) => rows,
        Err(e) => return c.fail(e, "run `voip-push-worker migrate`"),
    };
    let mut live_total = 0;
    let mut invalid_total = 0;
    let mut data = Vec::new();
    let mut notes = Vec::new();
    let mut unserved = Vec::new();
    let apps: Vec<String> = cfg.apps().into_iter().map(|a| a.bundle_id).collect();
    for r in &rows {
        let bundle: String = r.get(0);
        let env: String = r.get(1);
        let live: i64 = r.get(2);
        let invalid: i64 = r.get(3);
        live_total += live;
        invalid_total += invalid;
        notes.push(format!(
            "{bundle:<30} {env:<10} {live:>5} live {invalid:>5} invalidated"
        ));
        if live > 0 && !apps.contains(&bundle) && !unserved.contains(&bundle) {
            unserved.push(bundle.clone());
        }
        data.push(serde_json::json!({
            "bundleId": bundle, "environment": env, "live": live, "invalidated": invalid,
        }));
    }
    let detail = format!("{live_total} live, {invalid_total} invalidated");
    let mut c = c.with_data(serde_json::Value::Array(data));
    c.notes = notes;
    if !unserved.is_empty() {
        return c.warn(
            format!("{detail}; no app configured for {}", unserved.join(", ")),
            "calls to these devices fail: configure the app (bundle id, key) or fix the \
             bundle id the backend registers",
        );
    }
    if live_total == 0 {
        return c.warn(
            detail,
            "no live device token: registrations are not reaching this database \
             (register one with `voip-push-worker devices register`, or check \
             VPW__POSTGRES__URL is the database the backend writes to)",
        );
    }
    c.pass(detail)
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
    let conn = match within(timeout, "connect", crate::amqp::connect(cfg, "doctor")).await {
        Ok(c) => c,
        Err(e) => {
            return vec![
                connect.fail(
                    e,
                    format!(
                        "start RabbitMQ, or set VPW__AMQP__URL to where it runs (now {url}); \
                         check the user, password and vhost (%2f is /)"
                    ),
                ),
                topology.skip("no connection"),
                work.skip("no connection"),
                dead.skip("no connection"),
            ]
        }
    };
    let mut out = vec![connect.pass(url)];

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
    let result = within(timeout, "GET /readyz", async {
        let mut s = tokio::net::TcpStream::connect(authority).await?;
        let req = format!("GET /readyz HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        // /readyz answers a line; 16 KiB is more than any answer of ours.
        s.take(16 * 1024).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    })
    .await;
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
