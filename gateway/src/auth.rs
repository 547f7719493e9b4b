//! Who may open a WebSocket: a shared token, compared in constant time, and an Origin check.
//!
//! The token travels in an `Authorization: Bearer` header (programs) or in the first WebSocket
//! message (browsers cannot set headers on a WebSocket), never in the URL unless the operator
//! opts in: URLs end up in proxy logs and browser history. The Origin check stops another web
//! site from driving the fleet through a logged-in operator's browser (cross-site WebSocket
//! hijacking); programs that send no Origin are let through to the token check.

use std::path::Path;

use subtle::ConstantTimeEq;

/// Why a token could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {0} is empty")]
    Empty(String),
    #[error("cannot read random bytes for a token: {0}")]
    Random(std::io::Error),
    #[error("cannot write the generated token to {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The token clients must present.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    pub fn new(token: &str) -> Token {
        Token(token.as_bytes().to_vec())
    }

    /// Reads the first line of a file.
    pub fn from_file(path: &Path) -> Result<Token, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let line = text.lines().next().unwrap_or("").trim();
        if line.is_empty() {
            return Err(AuthError::Empty(path.display().to_string()));
        }
        Ok(Token::new(line))
    }

    /// 32 random bytes, hex: for a gateway started without a token.
    pub fn generate() -> Result<(Token, String), AuthError> {
        use std::io::Read as _;
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(AuthError::Random)?;
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok((Token::new(&text), text))
    }

    /// Constant-time comparison: the time taken does not depend on how many leading bytes
    /// match. (The length is not secret: tokens are generated with a fixed length.)
    pub fn matches(&self, candidate: &str) -> bool {
        bool::from(self.0.as_slice().ct_eq(candidate.as_bytes()))
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Decides whether a WebSocket from `origin` may connect to a gateway reached as `host`
/// (the request's Host header).
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    allowed: Vec<String>,
    any: bool,
}

impl OriginPolicy {
    pub fn new(allowed: &[String]) -> OriginPolicy {
        OriginPolicy {
            any: allowed.iter().any(|a| a == "*"),
            allowed: allowed
                .iter()
                .map(|a| a.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// `origin` is the Origin header (absent for non-browser clients), `host` the Host header.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if self.any {
            return true;
        }
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed.contains(&origin) {
            return true;
        }
        // Same host: the page was served by this gateway.
        let Some(host) = host else {
            return false;
        };
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        origin_host == Some(host.to_ascii_lowercase().as_str())
    }
}

/// Decides whether a request's Host header names this gateway.
///
/// A DNS-rebinding page (evil.example resolving first to the attacker, then to the gateway's
/// address) talks to the gateway as same-origin under the attacker's name: the Origin check
/// passes and the browser sends the request. The Host header still says `evil.example`, so
/// only names the operator knows are served: IP literals (rebinding needs a name), `localhost`,
/// this machine's hostname, the hosts of `--allow-origin` and `--allow-host`.
#[derive(Debug, Clone, Default)]
pub struct HostPolicy {
    names: Vec<String>,
    any: bool,
}

impl HostPolicy {
    /// `allowed` from `--allow-host`, `origins` from `--allow-origin`, `own` this machine's names.
    pub fn new(allowed: &[String], origins: &[String], own: &[String]) -> HostPolicy {
        let mut names: Vec<String> = vec!["localhost".into()];
        names.extend(own.iter().map(|n| n.to_ascii_lowercase()));
        for a in allowed {
            names.push(host_only(a).to_ascii_lowercase());
        }
        for o in origins {
            let rest = o
                .trim_end_matches('/')
                .split_once("://")
                .map(|(_, r)| r)
                .unwrap_or(o);
            names.push(host_only(rest).to_ascii_lowercase());
        }
        names.retain(|n| !n.is_empty());
        HostPolicy {
            any: allowed.iter().chain(origins).any(|a| a == "*"),
            names,
        }
    }

    /// `host` is the Host header; absent (HTTP/1.0 programs) is let through: browsers send one.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            return true;
        };
        if self.any {
            return true;
        }
        let name = host_only(host.trim());
        if name.parse::<std::net::IpAddr>().is_ok() {
            return true;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.names.contains(&name)
    }
}

/// `example:8080` -> `example`, `[::1]:8080` -> `::1`.
fn host_only(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h).unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Writes a generated token to `path`, readable by its owner only. An existing file (or a
/// symlink planted there) is removed first and the new one created exclusively, so the token
/// never lands in a file someone else made.
pub fn write_token_file(path: &Path, token: &str) -> Result<(), AuthError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| AuthError::Write {
        path: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    writeln!(f, "{token}").map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        let t = Token::new("s3cret");
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cret "));
        assert!(!t.matches(""));
        assert!(!t.matches("S3cret"));
        let (g, text) = Token::generate().unwrap();
        assert_eq!(text.len(), 64);
        assert!(g.matches(&text));
        assert_eq!(format!("{g:?}"), "Token(..)");
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn hosts() {
        let p = HostPolicy::new(
            &["gw.example".into()],
            &["https://ops.example:8443/".into()],
            &["gwhost".into()],
        );
        for ok in [
            None,
            Some("127.0.0.1:8080"),
            Some("[::1]:8080"),
            Some("10.0.0.7"),
            Some("localhost:8080"),
            Some("GW.example:8080"),
            Some("gw.example."),
            Some("ops.example"),
            Some("gwhost:1"),
        ] {
            assert!(p.allows(ok), "{ok:?}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "gw.example.evil",
            "127.0.0.1.nip.io",
        ] {
            assert!(!p.allows(Some(bad)), "{bad}");
        }
        assert!(HostPolicy::new(&["*".into()], &[], &[]).allows(Some("evil.example")));
    }

    #[test]
    fn token_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("cbus-gw-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t");
        std::fs::write(&path, "old").unwrap();
        write_token_file(&path, "abc").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abc\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn origins() {
        let p = OriginPolicy::new(&["https://ops.example/".into()]);
        assert!(p.allows(None, Some("gw:8080")));
        assert!(p.allows(Some("http://gw:8080"), Some("gw:8080")));
        assert!(p.allows(Some("https://GW:8080"), Some("gw:8080")));
        assert!(p.allows(Some("https://ops.example"), Some("gw:8080")));
        assert!(!p.allows(Some("https://evil.example"), Some("gw:8080")));
        assert!(!p.allows(Some("http://gw:8081"), Some("gw:8080")));
        assert!(!p.allows(Some("null"), Some("gw:8080")));
        assert!(OriginPolicy::new(&["*".into()]).allows(Some("https://x"), None));
    }
}
