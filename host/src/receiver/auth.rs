//! Bearer tokens on the receivers: `Authorization: Bearer <token>` over HTTP, the same as gRPC
//! metadata. With `receivers.auth.tokens_file` set, a request without a listed token is refused
//! before its body is read: HTTP 401, gRPC `UNAUTHENTICATED`, counted as
//! `tailgate_requests_total{outcome="unauthenticated"}`.
//!
//! - The file holds one token per line; blank lines and lines starting with `#` are skipped.
//!   A line `<token> tenant=<id>` binds the token to a tenant: every span received with it
//!   carries `tenant.id = <id>`, replacing whatever the sender claimed, so a client cannot
//!   charge its cost to another tenant.
//! - It is read at start (a missing or empty file fails the start) and again whenever it
//!   changes ([`super::files`]), a Kubernetes Secret's symlink swap included. A file that
//!   cannot be read on a change keeps the tokens already loaded.
//! - Tokens are kept as SHA-256 digests and a presented token is compared with every one in
//!   full, in constant time, so neither its content nor which token it matched shows in the
//!   time taken (which token matched picks the tenant only after every comparison). (Written here rather than taken from a crate: a fixed-length XOR-fold over
//!   digests is a few lines, and `sha2` is already a dependency.)
//! - A token never reaches a policy, an export or a log line: the receivers hand only the
//!   body on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

/// The tokens a listener accepts, swapped whole when the file changes.
pub(crate) struct Tokens {
    current: Arc<ArcSwap<Vec<Token>>>,
}

/// One line of the file: the token's digest, and the tenant it is bound to, if any.
struct Token {
    digest: [u8; 32],
    tenant: Option<Arc<str>>,
}

/// Who a request's token says sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A listed token, bound to no tenant: the spans' own `tenant.id` stands.
    Anyone,
    /// A listed token bound to this tenant: every span is stamped with it.
    Tenant(Arc<str>),
}

fn read_tokens(path: &Path) -> Result<Vec<Token>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the tokens file {}: {e}", path.display()))?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let token = words.next().expect("a non-empty line has a word");
        let tenant = match words.next() {
            None => None,
            Some(word) => match word.strip_prefix("tenant=") {
                Some(tenant) if !tenant.is_empty() && words.next().is_none() => {
                    Some(Arc::<str>::from(tenant))
                }
                _ => {
                    return Err(format!(
                        "{} line {}: expected `<token>` or `<token> tenant=<id>`",
                        path.display(),
                        i + 1
                    ));
                }
            },
        };
        tokens.push(Token {
            digest: Sha256::digest(token.as_bytes()).into(),
            tenant,
        });
    }
    if tokens.is_empty() {
        return Err(format!("the tokens file {} holds no token", path.display()));
    }
    Ok(tokens)
}

impl Tokens {
    /// Reads `path` now, and from then on every second it changes, until dropped.
    pub(crate) fn watch(path: PathBuf) -> Result<Arc<Self>, String> {
        let file = path.clone();
        let current = super::files::watch(vec![path], "tokens file", move || read_tokens(&file))?;
        Ok(Arc::new(Self { current }))
    }

    /// Whether an `Authorization` header value carries one of the tokens.
    pub(crate) fn allows(&self, authorization: Option<&[u8]>) -> bool {
        self.caller(authorization).is_some()
    }

    /// Who the `Authorization` header value's token belongs to; `None` for no listed token.
    pub(crate) fn caller(&self, authorization: Option<&[u8]>) -> Option<Caller> {
        let token = authorization.and_then(bearer)?;
        let presented: [u8; 32] = Sha256::digest(token).into();
        let tokens = self.current.load();
        let mut found: Option<&Token> = None;
        // Every digest is compared in full, whichever matches.
        for listed in tokens.iter() {
            let diff = listed
                .digest
                .iter()
                .zip(&presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(listed);
            }
        }
        found.map(|t| match &t.tenant {
            Some(tenant) => Caller::Tenant(tenant.clone()),
            None => Caller::Anyone,
        })
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
    use std::time::Duration;

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
        assert_eq!(tokens.caller(Some(b"Bearer alpha")), Some(Caller::Anyone));
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
        std::fs::write(&path, "delta tenant=acme\n").unwrap();
        let bound = Tokens::watch(path.clone()).unwrap();
        assert_eq!(
            bound.caller(Some(b"Bearer delta")),
            Some(Caller::Tenant("acme".into()))
        );
        std::fs::write(&path, "delta tenant=\n").unwrap();
        let err = Tokens::watch(path.clone()).err().unwrap();
        assert!(err.contains("line 1"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Tokens::watch(dir.join("missing")).is_err());
    }
}
