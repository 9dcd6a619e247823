//! TLS to Postgres and RabbitMQ, for real: a Postgres cluster that accepts only
//! `hostssl`, a TLS listener in front of the broker, certificates from a CA the
//! test makes. What managed services (RDS, Cloud SQL, CloudAMQP, Amazon MQ) ask.

use std::process::Output;
use std::time::Duration;

use serde_json::json;
use voip_push_worker::config::{AmqpConfig, Config, PostgresConfig};
use voip_push_worker::doctor::{postgres::postgres, services::rabbitmq, Check, Status};
use voip_push_worker::event::{Environment, Status as Delivery};
use voip_push_worker::store::ensure_database;

use crate::common::{unique, TestEnv};
use crate::tls_fixtures::{temp_dir, PgCluster, TestCa, TlsProxy};

const STEP: Duration = Duration::from_secs(5);

/// `migrate` with `url` as VPW__POSTGRES__URL (none when empty) and `env`.
fn migrate(url: &str, env: &[(&str, &str)]) -> Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_voip-push-worker"));
    c.env_remove("VPW_CONFIG").env("VPW_LOG", "warn");
    if !url.is_empty() {
        c.env("VPW__POSTGRES__URL", url);
    }
    c.envs(env.iter().copied())
        .arg("migrate")
        .output()
        .expect("run migrate")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn one<'a>(checks: &'a [Check], id: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("{id} missing: {checks:#?}"))
}

fn pg_config(url: String) -> Config {
    let mut cfg = Config::default();
    cfg.postgres.url = url;
    cfg
}

/// A temporary directory, the good CA and another, a TLS-only cluster with the
/// good CA's certificate, and a database name for this test.
async fn servers() -> (std::path::PathBuf, TestCa, TestCa, PgCluster, String) {
    let dir = temp_dir("vpw-it-tls-");
    let ca = TestCa::new(&dir, "good");
    let other = TestCa::new(&dir, "other");
    let pg = PgCluster::start(&ca).await;
    (dir, ca, other, pg, unique("vpw_tls_"))
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_and_doctor_against_a_tls_only_postgres() {
    let (dir, ca, other, pg, db) = servers().await;
    let root = |ca: &TestCa| format!("sslrootcert={}", ca.ca_file.display());
    let full = pg.url(
        "localhost",
        &db,
        &format!("sslmode=verify-full&{}", root(&ca)),
    );

    let out = migrate(&full, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("created database"), "{}", text(&out));
    assert!(text(&out).contains("applied"), "{}", text(&out));

    // The CA from VPW__POSTGRES__CA_FILE instead of the URL.
    let ca_path = ca.ca_file.display().to_string();
    let out = migrate(
        &pg.url("localhost", &db, "sslmode=verify-full"),
        &[("VPW__POSTGRES__CA_FILE", &ca_path)],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("up to date"), "{}", text(&out));

    // The URL (a secret: it may carry a password) from a file, as Kubernetes mounts it.
    let url_file = dir.join("postgres-url");
    std::fs::write(&url_file, format!("{full}\n")).unwrap();
    let url_file = url_file.display().to_string();
    let out = migrate("", &[("VPW__POSTGRES__URL_FILE", &url_file)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("up to date"), "{}", text(&out));

    // A certificate from another CA, a name the certificate does not carry, no
    // TLS at all: each refused, each saying what to change.
    let wrong_ca = pg.url(
        "localhost",
        &db,
        &format!("sslmode=verify-full&{}", root(&other)),
    );
    let wrong_host = pg.url(
        "127.0.0.1",
        &db,
        &format!("sslmode=verify-full&{}", root(&ca)),
    );
    let plaintext = pg.url("localhost", &db, "sslmode=disable");
    for (url, words) in [
        (&wrong_ca, ["UnknownIssuer", "not signed by a CA we trust"]),
        (
            &wrong_host,
            ["not valid for name", "is not for \"127.0.0.1\""],
        ),
        (&plaintext, ["no encryption", "no pg_hba.conf entry"]),
    ] {
        let out = migrate(url, &[]);
        assert!(!out.status.success(), "{url}: {}", text(&out));
        for w in words {
            assert!(text(&out).contains(w), "{url}: {w:?} in {}", text(&out));
        }
    }

    // verify-ca checks the chain, not the name: 127.0.0.1 is fine then.
    let out = migrate(
        &pg.url(
            "127.0.0.1",
            &db,
            &format!("sslmode=verify-ca&{}", root(&ca)),
        ),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));

    // SCRAM with channel binding required: the binding we compute from the
    // server's certificate must be the one the server computes.
    let (admin, tls) = voip_push_worker::tls::postgres::connect_config(&PostgresConfig {
        url: full.clone(),
        ..Default::default()
    })
    .unwrap();
    let (client, conn) = admin.connect(tls).await.expect("connect over TLS");
    tokio::spawn(conn);
    client
        .batch_execute("CREATE ROLE scram_user LOGIN PASSWORD 'pw'")
        .await
        .unwrap();
    let scram = full.replace("postgres@", "scram_user:pw@") + "&channel_binding=require";
    let (scram, tls) = voip_push_worker::tls::postgres::connect_config(&PostgresConfig {
        url: scram,
        ..Default::default()
    })
    .unwrap();
    let (bound, conn) = scram.connect(tls).await.expect("SCRAM-SHA-256-PLUS");
    tokio::spawn(conn);
    bound.simple_query("SELECT 1").await.unwrap();

    // doctor: encrypted and verified, or the fix.
    let checks = postgres(&pg_config(full), STEP).await;
    let tls = one(&checks, "postgres.tls");
    assert_eq!(tls.status, Status::Pass, "{checks:#?}");
    assert!(tls.detail.contains("TLSv1."), "{tls:?}");
    assert!(
        tls.detail.contains("certificate and host name verified"),
        "{tls:?}"
    );
    assert_eq!(tls.data["verification"], "full");
    assert_eq!(one(&checks, "postgres.migrations").status, Status::Pass);

    for (url, fix) in [
        (wrong_ca, "point sslrootcert"),
        (wrong_host, "connect by the name on the certificate"),
        (plaintext, "accepts only encrypted connections"),
    ] {
        let checks = postgres(&pg_config(url.clone()), STEP).await;
        assert_eq!(one(&checks, "postgres.connect").status, Status::Fail);
        let tls = one(&checks, "postgres.tls");
        assert_eq!(tls.status, Status::Fail, "{url}: {checks:#?}");
        let got = tls.fix.as_deref().unwrap_or_default();
        assert!(got.contains(fix), "{url}: {fix:?} in {got:?}");
    }

    // Encryption without a CA (libpq's require): allowed, and said so.
    let checks = postgres(
        &pg_config(pg.url("localhost", &db, "sslmode=require")),
        STEP,
    )
    .await;
    let tls = one(&checks, "postgres.tls");
    assert!(tls.detail.contains("certificate not verified"), "{tls:?}");
    assert_eq!(tls.data["verification"], "none");
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_rings_over_tls_to_postgres_and_rabbitmq() {
    let (dir, ca, other, pg, db) = servers().await;
    let mq = TlsProxy::start(&ca, 5672).await;
    let pg_url = pg.url(
        "localhost",
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", ca.ca_file.display()),
    );
    let pg_cfg = PostgresConfig {
        url: pg_url.clone(),
        ..Default::default()
    };
    ensure_database(&pg_cfg)
        .await
        .expect("create the database over TLS");
    let amqp_url = |host: &str| format!("amqps://guest:guest@{host}:{}/%2f", mq.port);

    let mut env = TestEnv::with(|cfg| {
        cfg.postgres.url = pg_url.clone();
        cfg.amqp.url = amqp_url("localhost");
        cfg.amqp.ca_file = Some(ca.ca_file.clone());
    })
    .await;
    env.device("tls-user", Some(Environment::Sandbox), Environment::Sandbox)
        .await;
    let call = unique("tls-call-");
    env.publish(json!({"callId": call, "toUserId": "tls-user"}))
        .await;
    let results = env.results_for(&call, 1).await;
    assert_eq!(results[0].status, Delivery::Delivered, "{results:#?}");
    let (status, body) = env.http_get("/readyz").await;
    assert_eq!(status, 200, "{body}");

    // doctor over the same connections.
    let mq_checks = rabbitmq(&env.cfg.amqp, STEP).await;
    let tls = one(&mq_checks, "rabbitmq.tls");
    assert_eq!(tls.status, Status::Pass, "{mq_checks:#?}");
    assert!(tls.detail.contains("host name verified"), "{tls:?}");
    assert_eq!(one(&mq_checks, "rabbitmq.topology").status, Status::Pass);

    // A broker certificate from another CA, or for another name, is refused;
    // amqps:// to the plain port is named as such.
    for (cfg, word, fix) in [
        (
            AmqpConfig {
                url: amqp_url("localhost"),
                ca_file: Some(other.ca_file.clone()),
                ..env.cfg.amqp.clone()
            },
            "UnknownIssuer",
            "VPW__AMQP__CA_FILE",
        ),
        (
            AmqpConfig {
                url: amqp_url("127.0.0.1"),
                ..env.cfg.amqp.clone()
            },
            "not valid for name",
            "connect by the name on the certificate",
        ),
        (
            AmqpConfig {
                url: "amqps://guest:guest@localhost:5672/%2f".into(),
                ..env.cfg.amqp.clone()
            },
            "InvalidContentType",
            "does not speak TLS there",
        ),
    ] {
        let err = voip_push_worker::amqp::connect(&cfg, "test")
            .await
            .expect_err("refused");
        let chain = voip_push_worker::tls::error_chain(&err);
        assert!(chain.contains(word), "{word:?} in {chain}");
        // The hot path's own connections (`amqp::wire`) refuse it alike.
        let wire =
            voip_push_worker::amqp::wire::WirePublisher::open(&cfg, "test", Default::default())
                .await
                .err()
                .expect("refused")
                .to_string();
        assert!(wire.contains(word), "{word:?} in {wire}");
        let checks = rabbitmq(&cfg, STEP).await;
        let tls = one(&checks, "rabbitmq.tls");
        assert_eq!(tls.status, Status::Fail, "{checks:#?}");
        assert!(
            tls.fix.as_deref().unwrap_or_default().contains(fix),
            "{tls:?}"
        );
    }
    env.cleanup().await;
    drop(mq);
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
}
