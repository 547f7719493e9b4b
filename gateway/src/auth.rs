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
