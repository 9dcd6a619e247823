//! libpq's TLS parameters in a Postgres connection string. tokio-postgres knows
//! `sslmode` only up to `require` and refuses `sslrootcert`, `sslcert` and
//! `sslkey`, so we take them out (of a URL's query or a `key=value` string)
//! before it parses the rest.

use std::path::PathBuf;

/// libpq's `sslmode`; the default is libpq's, `prefer`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            // libpq's `allow` (plaintext first) would let a network attacker keep
            // us in plaintext; nobody needs it over `prefer`.
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, prefer, require, verify-ca, \
                     verify-full"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// Where trusted roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the public CAs (libpq 16's spelling).
    System,
}

/// The TLS parameters of one connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SslParams {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

const OURS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits `conn` into the string tokio-postgres parses and our TLS parameters.
pub fn split(conn: &str) -> Result<(String, SslParams), String> {
    let is_url = conn.starts_with("postgres://") || conn.starts_with("postgresql://");
    let (rest, ours) = if is_url {
        split_url(conn)?
    } else {
        split_key_values(conn)?
    };
    let mut p = SslParams::default();
    let mut mode = None;
    for (k, v) in ours {
        match k.as_str() {
            "sslmode" => mode = Some(SslMode::parse(&v)?),
            "sslrootcert" if v == "system" => p.root_cert = Some(RootCert::System),
            "sslrootcert" => p.root_cert = Some(RootCert::File(v.into())),
            "sslcert" => p.cert = Some(v.into()),
            _ => p.key = Some(v.into()),
        }
    }
    // As libpq 16: the public CAs authenticate only together with the host name.
    p.mode = match (mode, &p.root_cert) {
        (None, Some(RootCert::System)) => SslMode::VerifyFull,
        (Some(m), Some(RootCert::System)) if m != SslMode::VerifyFull => {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full (not {})",
                m.as_str()
            ))
        }
        (m, _) => m.unwrap_or_default(),
    };
    if p.cert.is_some() != p.key.is_some() {
        return Err("sslcert and sslkey go together".into());
    }
    Ok((rest, p))
}

type Pairs = Vec<(String, String)>;

fn split_url(url: &str) -> Result<(String, Pairs), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut ours = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let key = percent_decode(k)?;
        if OURS.contains(&key.as_str()) {
            ours.push((key, percent_decode(v)?));
        } else {
            kept.push(part);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, ours))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// libpq's `key = value` form: values bare or in single quotes, `\` escaping.
fn key_values(s: &str) -> Result<Pairs, String> {
    let mut chars = s.chars().peekable();
    let mut pairs = Vec::new();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("{key:?} has no value (key=value)"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if_eq(&'\'').is_some();
        let mut value = String::new();
        loop {
            match chars.next() {
                None if quoted => return Err(format!("unterminated quote in {key:?}")),
                None => break,
                Some('\'') if quoted => break,
                Some(c) if c.is_whitespace() && !quoted => break,
                Some('\\') => value.push(chars.next().ok_or("trailing backslash")?),
                Some(c) => value.push(c),
            }
        }
        pairs.push((key, value));
    }
}

fn join_key_values<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn split_key_values(s: &str) -> Result<(String, Pairs), String> {
    let (ours, kept): (Pairs, Pairs) = key_values(s)?
        .into_iter()
        .partition(|(k, _)| OURS.contains(&k.as_str()));
    let rest = join_key_values(kept.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Ok((rest, ours))
}

/// A `key=value` connection string fit for a log: the password hidden (one that
/// does not parse is hidden whole).
pub fn redact_key_values(s: &str) -> String {
    match key_values(s) {
        Ok(pairs) => join_key_values(pairs.iter().map(|(k, v)| {
            let v = if k == "password" { "***" } else { v.as_str() };
            (k.as_str(), v)
        })),
        Err(_) => "<unparsable connection string>".into(),
    }
}

#[cfg(test)]
mod tests;
