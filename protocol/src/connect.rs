//! NATS credentials, turned into connection options the same way by every part.
//!
//! Each binary keeps its own flags and its own retry policy (the agent retries forever, the CLI
//! fails fast); what the credentials mean is decided once, here.

use std::path::PathBuf;

use async_nats::ConnectOptions;

/// Why the credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read NATS credentials {path}: {source}")]
    Creds {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS CA {0} does not exist")]
    MissingCa(String),
    #[error("a NATS password needs a user (--user)")]
    PasswordWithoutUser,
}

/// Whatever the operator gave to authenticate with; any combination the server accepts.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// A `.creds` file (user JWT and seed).
    pub creds: Option<PathBuf>,
    /// An nkey seed (`SU...`) to sign the server's challenge with.
    pub nkey_seed: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// CA certificate of a server with TLS; requires TLS when given.
    pub tls_ca: Option<PathBuf>,
}

impl Credentials {
    /// Connection options carrying these credentials.
    pub async fn options(&self) -> Result<ConnectOptions, CredentialsError> {
        let mut opts = match &self.nkey_seed {
            Some(seed) => ConnectOptions::with_nkey(seed.clone()),
            None => ConnectOptions::new(),
        };
        if let Some(path) = &self.creds {
            opts = opts
                .credentials_file(path.clone())
                .await
                .map_err(|source| CredentialsError::Creds {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
            (None, Some(_)) => return Err(CredentialsError::PasswordWithoutUser),
            _ => {}
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca {
            if !ca.exists() {
                return Err(CredentialsError::MissingCa(ca.display().to_string()));
            }
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(opts)
    }
}
