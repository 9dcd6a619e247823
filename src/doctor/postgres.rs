//! `doctor`'s Postgres checks: reachable (and how: TLS, verification), migrated,
//! device tokens present.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use super::services::within;
use super::{Check, Section};
use crate::config::{redact_url, Config};
use crate::store::migrate::{pending, MIGRATIONS};
use crate::tls::postgres::{PgTls, Verification};
use crate::tls::{error_chain, is_local, TlsFailure};

const CA_SETTING: &str = "sslrootcert in VPW__POSTGRES__URL (or VPW__POSTGRES__CA_FILE)";

/// `postgres.connect`, `postgres.tls`, `postgres.migrations`, `postgres.tokens`.
pub async fn postgres(cfg: &Config, timeout: Duration) -> Vec<Check> {
    let url = redact_url(&cfg.postgres.url);
    let connect = Check::new("postgres.connect", Section::Postgres, "Postgres reachable");
    let tls_check = Check::new("postgres.tls", Section::Postgres, "Postgres encryption");
    let migrations = Check::new(
        "postgres.migrations",
        Section::Postgres,
        "migrations current",
    );
    let tokens = Check::new("postgres.tokens", Section::Postgres, "device tokens");
    let (mut pg, tls) = match crate::tls::postgres::connect_config(&cfg.postgres) {
        Ok(c) => c,
        Err(e) => {
            return vec![
                connect.fail(
                    format!("{url}: {e}"),
                    "set VPW__POSTGRES__URL to postgres://USER[:PASSWORD]@HOST:PORT/DATABASE\
                     [?sslmode=verify-full&sslrootcert=CA.pem], with files that exist",
                ),
                tls_check.skip("no connection"),
                migrations.skip("no connection"),
                tokens.skip("no connection"),
            ]
        }
    };
    let host = first_host(&pg);
    pg.connect_timeout(timeout);
    pg.application_name("voip-push-worker doctor");
    let client = match tokio::time::timeout(timeout, pg.connect(tls.clone())).await {
        Ok(Ok((client, conn))) => {
            tokio::spawn(conn);
            client
        }
        failed => {
            let mut tls_verdict = tls_check.clone().skip("no connection");
            let (detail, fix) = match failed {
                Ok(Err(e)) => {
                    let detail = format!("{url}: {}", pg_error(&e));
                    match TlsFailure::of(&error_chain(&e)) {
                        Some(f) => {
                            let fix = f.fix(CA_SETTING, &host);
                            tls_verdict = tls_check.fail(detail.clone(), fix.clone());
                            (detail, fix)
                        }
                        None => (detail, connect_fix(&e, &url)),
                    }
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
                tls_verdict,
                migrations.skip("no connection"),
                tokens.skip("no connection"),
            ];
        }
    };
    let mut out = vec![
        connect.pass(url),
        tls_state(&client, &tls, &host, tls_check, timeout).await,
    ];

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

fn connect_fix(e: &tokio_postgres::Error, url: &str) -> String {
    match e.code() {
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
    }
}

fn first_host(pg: &tokio_postgres::Config) -> String {
    match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    }
}

/// `postgres.tls`: what the server says of this connection (`pg_stat_ssl`) and
/// what we checked of its certificate. Plaintext or an unchecked certificate is
/// fine on this machine, worth a warning across a network.
async fn tls_state(
    client: &tokio_postgres::Client,
    tls: &PgTls,
    host: &str,
    c: Check,
    timeout: Duration,
) -> Check {
    let row = within(
        timeout,
        "pg_stat_ssl",
        client.query_opt(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        ),
    )
    .await;
    let (encrypted, version) = match row {
        Ok(Some(r)) => (r.get::<_, bool>(0), r.get::<_, Option<String>>(1)),
        _ => (tls.verification != Verification::Off, None),
    };
    let verification = if encrypted {
        tls.verification
    } else {
        Verification::Off
    };
    let mode = tls.mode.as_str();
    let detail = format!(
        "{}{} (sslmode={mode})",
        version.map(|v| format!("{v}, ")).unwrap_or_default(),
        verification.describe()
    );
    let c = c.with_data(serde_json::json!({
        "encrypted": encrypted,
        "verification": format!("{verification:?}").to_lowercase(),
        "sslmode": mode,
    }));
    match verification {
        Verification::Full | Verification::Chain => c.pass(detail),
        _ if is_local(host) => c.pass(detail),
        Verification::None => c.warn(
            detail,
            format!(
                "anyone on the path could pose as {host}: add sslmode=verify-full and \
                 {CA_SETTING} naming your provider's CA"
            ),
        ),
        Verification::Off => c.warn(
            detail,
            "the connection to Postgres is in plaintext: turn TLS on at the server and set \
             sslmode=verify-full in VPW__POSTGRES__URL",
        ),
    }
}

/// The server's own message, not tokio-postgres' "db error" wrapper.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => error_chain(e),
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
