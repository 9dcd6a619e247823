//! Real TLS servers for `tls.rs`: a CA of the test's own, a throwaway Postgres
//! cluster that accepts only `hostssl`, and a TLS listener (socat) in front of
//! the local RabbitMQ. Each is stopped when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::common::{eventually, unique};

/// A CA and one server certificate it signed (for `localhost` only, so a
/// connection to 127.0.0.1 is a host-name mismatch), as PEM files in `dir`.
pub struct TestCa {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("vpw test CA {name}"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let write = |file: &str, pem: String| {
            let p = dir.join(format!("{name}-{file}"));
            std::fs::write(&p, pem).unwrap();
            p
        };
        Self {
            ca_file: write("ca.pem", ca_cert.pem()),
            cert_file: write("server.pem", cert.pem()),
            key_file: write("server.key", key.serialize_pem()),
        }
    }
}

pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_listening(what: &str, port: u16) {
    eventually(what, Duration::from_secs(30), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// A Postgres cluster of its own: `ssl = on` with `ca`'s server certificate,
/// `pg_hba.conf` with `hostssl` lines only.
pub struct PgCluster {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect("initdb under /usr/lib/postgresql/*/bin")
}

/// initdb and postgres refuse to run as root: run them as `postgres` then.
fn as_db_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn is_root() -> bool {
    // `id -u` rather than libc: the test crate has no libc dependency.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgCluster {
    pub async fn start(ca: &TestCa) -> Self {
        let bin = pg_bin();
        let dir = temp_dir("vpw-it-pg-");
        let data = dir.join("data");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(&dir);
                    c
                },
                "chown",
            );
        }
        let mut initdb = as_db_user(&bin.join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data);
        run(initdb, "initdb");
        for (from, to) in [(&ca.cert_file, "server.crt"), (&ca.key_file, "server.key")] {
            std::fs::copy(from, data.join(to)).unwrap();
        }
        let port = free_port();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             fsync = off\nmax_connections = 40\n",
            dir.display()
        );
        append(&data.join("postgresql.conf"), &conf);
        std::fs::write(
            data.join("pg_hba.conf"),
            // A password user for SCRAM with channel binding; everyone else trusted.
            "hostssl all scram_user 127.0.0.1/32 scram-sha-256\n\
             hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .unwrap();
        if is_root() {
            let mut c = Command::new("chown");
            c.args(["-R", "postgres:postgres"]).arg(&dir);
            run(c, "chown");
        }
        std::fs::set_permissions(
            data.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let mut start = as_db_user(&bin.join("pg_ctl"));
        start
            .args(["-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .arg("start")
            .stdout(Stdio::null());
        run(start, "pg_ctl start");
        let cluster = Self { port, dir, bin };
        wait_listening("the test cluster to listen", port).await;
        cluster
    }

    /// A URL for `db` on this cluster through `host`, with libpq parameters.
    pub fn url(&self, host: &str, db: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/{db}?{params}", self.port)
    }
}

fn append(file: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut stop = as_db_user(&self.bin.join("pg_ctl"));
        stop.args(["-m", "immediate", "-w", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = stop.status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `socat` terminating TLS (with `ca`'s server certificate) in front of the
/// local broker's plain port.
pub struct TlsProxy {
    pub port: u16,
    child: Child,
}

impl TlsProxy {
    pub async fn start(ca: &TestCa, upstream_port: u16) -> Self {
        let port = free_port();
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,cert={},key={},verify=0,fork,reuseaddr",
            ca.cert_file.display(),
            ca.key_file.display()
        );
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new("socat")
                .arg(listen)
                .arg(format!("TCP:127.0.0.1:{upstream_port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own group, so the forked per-connection children go too.
                .process_group(0)
                .spawn()
                .expect("socat (apt-get install socat)")
        };
        let proxy = Self { port, child };
        wait_listening("socat to listen", port).await;
        proxy
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .status();
        let _ = self.child.wait();
    }
}
