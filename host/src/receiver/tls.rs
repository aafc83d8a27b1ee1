//! TLS on a listener (the receivers' and the admin listener's): rustls, with the certificate,
//! key and optional client CA read from PEM files and read again whenever one changes
//! ([`super::files`]), so a rotated certificate serves new connections without a restart while
//! open connections keep the one they shook hands with.
//!
//! - The handshake runs in the connection's own task, never in the accept loop, and must finish
//!   within the listener's `header_read_timeout`.
//! - With `client_ca_file` a client must present a certificate that CA issued (mutual TLS);
//!   one that presents none, or another, fails the handshake.
//! - ALPN offers `h2` and `http/1.1`: gRPC clients insist on `h2`.
//! - Failed handshakes are counted by listener, and logged at debug: a port scan must not
//!   flood the log.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::config::TlsFiles;

/// A listener's TLS settings, as last loaded from its files.
pub(crate) struct Tls {
    current: Arc<ArcSwap<ServerConfig>>,
}

impl Tls {
    /// Loads the files named by `config` (`key` names the table, for errors) and watches them.
    pub(crate) fn watch(key: &str, config: &TlsFiles) -> Result<Arc<Self>, String> {
        let mut paths = vec![config.cert_file.clone(), config.key_file.clone()];
        paths.extend(config.client_ca_file.clone());
        let (files, key) = (config.clone(), key.to_owned());
        let current = super::files::watch(paths, "TLS certificate", move || {
            server_config(&files).map_err(|e| format!("{key}: {e}"))
        })?;
        Ok(Arc::new(Self { current }))
    }

    /// The acceptor for a new connection, with the settings loaded now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

fn server_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    let certs = read_certs(&files.cert_file, "cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| format!("key_file {}: {e}", files.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path, "client_ca_file")? {
                roots
                    .add(cert)
                    .map_err(|e| format!("client_ca_file {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client_ca_file {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "cert_file {} and key_file {}: {e}",
            files.cert_file.display(),
            files.key_file.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{key} {}: no certificate in it", path.display()));
    }
    Ok(certs)
}
