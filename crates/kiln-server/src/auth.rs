//! Bearer-token check for the TCP listener. The token is kept only as a SHA-256 digest and compared in
//! constant time, so neither memory dumps nor timing reveal it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

pub struct TokenCheck {
    digest: [u8; 32],
}

impl TokenCheck {
    pub fn new(token: &str) -> Self {
        TokenCheck {
            digest: Sha256::digest(token.trim().as_bytes()).into(),
        }
    }

    pub fn accepts(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        d.iter()
            .zip(self.digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

pub async fn require_token(
    State(check): State<Arc<TokenCheck>>,
    req: Request,
    next: Next,
) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| check.accepts(t));
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::TokenCheck;

    #[test]
    fn compares_tokens() {
        let c = TokenCheck::new("secret\n");
        assert!(c.accepts("secret"));
        assert!(!c.accepts("secreT"));
        assert!(!c.accepts(""));
    }
}
