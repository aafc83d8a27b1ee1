//! Bearer tokens on the receivers: `Authorization: Bearer <token>` over HTTP, the same as gRPC
//! metadata. With `receivers.auth.tokens_file` set, a request without a listed token is refused
//! before its body is read: HTTP 401, gRPC `UNAUTHENTICATED`, counted as
//! `tailgate_requests_total{outcome="unauthenticated"}`.
//!
//! - The file holds one token per line; blank lines and lines starting with `#` are skipped.
//!   It is read at start (a missing or empty file fails the start) and again whenever it
//!   changes, looked at once a second by its metadata, so a Kubernetes Secret's symlink swap is
//!   picked up too. A file that cannot be read on a change keeps the tokens already loaded.
//! - Tokens are kept as SHA-256 digests and a presented token is compared with every one in
//!   full, in constant time, so neither its content nor which token it matched shows in the
//!   time taken. (Written here rather than taken from a crate: a fixed-length XOR-fold over
//!   digests is a few lines, and `sha2` is already a dependency.)
//! - A token never reaches a policy, an export or a log line: the receivers hand only the
//!   body on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

/// The tokens a receiver accepts, swapped whole when the file changes.
pub(crate) struct Tokens {
    digests: ArcSwap<Vec<[u8; 32]>>,
}

/// What identifies a version of the tokens file: a change of any of these is a reload.
type Stamp = (Option<SystemTime>, u64, u64);

fn stamp_of(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len(), meta.ino()))
}

fn read_tokens(path: &Path) -> Result<Vec<[u8; 32]>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the tokens file {}: {e}", path.display()))?;
    let digests: Vec<[u8; 32]> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|token| Sha256::digest(token.as_bytes()).into())
        .collect();
    if digests.is_empty() {
        return Err(format!("the tokens file {} holds no token", path.display()));
    }
    Ok(digests)
}

impl Tokens {
    /// Reads `path` now, and from then on every second it changes, until the process ends.
    pub(crate) fn watch(path: PathBuf) -> Result<Arc<Self>, String> {
        let tokens = Arc::new(Self {
            digests: ArcSwap::from_pointee(read_tokens(&path)?),
        });
        let weak = Arc::downgrade(&tokens);
        let mut seen = stamp_of(&path);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(tokens) = weak.upgrade() else { return };
                let now = stamp_of(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match read_tokens(&path) {
                    Ok(digests) => {
                        tracing::info!(tokens = digests.len(), file = %path.display(), "receiver tokens reloaded");
                        tokens.digests.store(Arc::new(digests));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "keeping the receiver tokens loaded before")
                    }
                }
            }
        });
        Ok(tokens)
    }

    /// Whether an `Authorization` header value carries one of the tokens.
    pub(crate) fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = authorization.and_then(bearer) else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut matched = 0u8;
        for digest in self.digests.load().iter() {
            let diff = digest
                .iter()
                .zip(&presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            matched |= u8::from(diff == 0);
        }
        matched == 1
    }
}

/// The token of `Bearer <token>` (the scheme in any case, as RFC 9110 has it).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !rest.is_empty()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listed_tokens_pass_others_do_not_and_a_changed_file_is_picked_up() {
        let dir = std::env::temp_dir().join(format!("tailgate-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "# receivers\nalpha\n\n beta \n").unwrap();
        let tokens = Tokens::watch(path.clone()).unwrap();
        assert!(tokens.allows(Some(b"Bearer alpha")));
        assert!(tokens.allows(Some(b"bearer beta")));
        assert!(!tokens.allows(Some(b"Bearer gamma")));
        assert!(!tokens.allows(Some(b"alpha")), "the scheme is required");
        assert!(!tokens.allows(Some(b"Bearer ")));
        assert!(!tokens.allows(None));
        // Replaced the way a Secret is: a new file renamed over the old.
        std::fs::write(dir.join("tokens.new"), "gamma\n").unwrap();
        std::fs::rename(dir.join("tokens.new"), &path).unwrap();
        let mut swapped = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tokens.allows(Some(b"Bearer gamma")) {
                swapped = true;
                break;
            }
        }
        assert!(swapped, "the new file is read within a few seconds");
        assert!(!tokens.allows(Some(b"Bearer alpha")));
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            tokens.allows(Some(b"Bearer gamma")),
            "an empty file keeps the tokens loaded before"
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Tokens::watch(dir.join("missing")).is_err());
    }
}
