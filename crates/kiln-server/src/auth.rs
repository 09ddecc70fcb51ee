//! Bearer-token check for the TCP listener. Only a SHA-256 digest of the token is stored, in
//! `<data dir>/api-token.sha256` (mode 0600); the daemon never keeps the token itself. The file is read on
//! every TCP request, so `kiln token rotate` (which rewrites it) takes effect at once, running daemon or not.
//! Digests are compared in constant time, so timing does not reveal how much of a guess was right.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

pub const TOKEN_HASH_FILE: &str = "api-token.sha256";
/// Shorter tokens given with `--token-file` are refused: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

pub fn token_hash_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_HASH_FILE)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Stores the digest of `token` (atomically, mode 0600), replacing any previous one.
pub fn install_token(data_dir: &Path, token: &str) -> std::io::Result<()> {
    let path = token_hash_path(data_dir);
    let tmp = data_dir.join(format!(".{TOKEN_HASH_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{}", hex::encode(digest(token)))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)
}

/// A new random token (256 bits, hex), installed in place of the old one. The caller shows it once.
pub fn rotate_token(data_dir: &Path) -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    let token = hex::encode(bytes);
    install_token(data_dir, &token)?;
    Ok(token)
}

fn read_digest(path: &Path) -> Option<[u8; 32]> {
    let text = std::fs::read_to_string(path).ok()?;
    let bytes = hex::decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

/// Whether a token has been installed (a readable, well-formed digest file).
pub fn has_token(data_dir: &Path) -> bool {
    read_digest(&token_hash_path(data_dir)).is_some()
}

pub struct TokenCheck {
    path: PathBuf,
}

impl TokenCheck {
    pub fn new(data_dir: &Path) -> Self {
        TokenCheck {
            path: token_hash_path(data_dir),
        }
    }

    /// A missing or unreadable digest file accepts nothing.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        match read_digest(&self.path) {
            Some(stored) => constant_time_eq(&presented, &stored),
            None => false,
        }
    }
}

pub async fn require_token(
    State(check): State<Arc<TokenCheck>>,
    req: Request,
    next: Next,
) -> Response {
    // The dashboard's static files hold no secrets; the API calls it makes carry the token.
    if crate::ui::is_ui_path(req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let ok = match presented {
        Some(t) => {
            let check = check.clone();
            tokio::task::spawn_blocking(move || check.accepts(&t))
                .await
                .unwrap_or(false)
        }
        None => false,
    };
    if ok {
        next.run(req).await
    } else {
        // The same answer whatever was wrong: no header, wrong scheme or wrong token.
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token: send 'Authorization: Bearer <token>' with the daemon's current token (`kiln token rotate` issues a new one)",
        )
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_only_a_digest_and_rotation_invalidates_the_old_token() {
        let dir = tempfile::tempdir().unwrap();
        let check = TokenCheck::new(dir.path());
        assert!(!check.accepts("anything"), "no token installed yet");
        install_token(dir.path(), "secret-token-0123456789\n").unwrap();
        let stored = std::fs::read_to_string(token_hash_path(dir.path())).unwrap();
        assert!(!stored.contains("secret"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(token_hash_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(check.accepts("secret-token-0123456789"));
        assert!(!check.accepts("secret-token-012345678X"));
        assert!(!check.accepts(""));
        let new = rotate_token(dir.path()).unwrap();
        assert_eq!(new.len(), 64);
        assert!(check.accepts(&new));
        assert!(!check.accepts("secret-token-0123456789"));
    }
}
