//! `listeners[]`, and the TLS files of listeners and upstreams (`tls:`).

use super::*;

impl Validator<'_> {
    /// Validates `listeners[]`: names unique, binds parsed, TLS files readable, defaults filled.
    pub(super) fn listeners(&mut self, raw: &[RawListener]) -> Vec<ListenerConfig> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        for (i, l) in raw.iter().enumerate() {
            let p = format!("listeners[{i}]");
            if l.name.is_empty() {
                self.error(&format!("{p}.name"), "a listener name cannot be empty");
            } else if !names.insert(l.name.clone()) {
                self.error(
                    &format!("{p}.name"),
                    format!("duplicate listener name `{}`", l.name),
                );
            }
            let bind = self.socket_addr(&format!("{p}.bind"), &l.bind);
            let protocol = match l.protocol.as_deref() {
                None | Some("auto") => ListenerProtocol::Auto,
                Some("http1") => ListenerProtocol::Http1,
                Some("http2") => ListenerProtocol::Http2,
                Some(other) => {
                    self.one_of(&format!("{p}.protocol"), other, &["http1", "http2", "auto"]);
                    ListenerProtocol::Auto
                }
            };
            let tls = l.tls.as_ref().map(|t| self.listener_tls(&p, t));
            let max_header_bytes = l.max_header_bytes.unwrap_or(Size(64 << 10));
            if max_header_bytes.0 < 8192 || max_header_bytes.0 > (16 << 20) {
                self.error(
                    &format!("{p}.max_header_bytes"),
                    "expected a size from 8KiB to 16MiB",
                );
            }
            let request_header_timeout = l
                .request_header_timeout
                .unwrap_or(Dur(Duration::from_secs(10)));
            if request_header_timeout.0.is_zero() {
                self.error(
                    &format!("{p}.request_header_timeout"),
                    "must be greater than 0s",
                );
            }
            let idle_timeout = l.idle_timeout.unwrap_or(Dur(Duration::from_secs(60)));
            if idle_timeout.0.is_zero() {
                self.error(&format!("{p}.idle_timeout"), "must be greater than 0s");
            }
            out.push(ListenerConfig {
                name: l.name.clone(),
                bind: bind.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
                protocol,
                tls,
                request_header_timeout,
                idle_timeout,
                max_connections: self.positive(
                    &format!("{p}.max_connections"),
                    l.max_connections,
                    10_000,
                ),
                max_header_bytes,
                http1_fast_path: l.http1_fast_path.unwrap_or(true),
            });
        }
        out
    }

    /// `listeners[i].tls`: files readable and parsable, key matches certificate,
    /// certificate not expired (a warning within 14 days of expiry).
    pub(super) fn listener_tls(&mut self, p: &str, t: &RawListenerTls) -> ListenerTls {
        let (cp, kp) = (format!("{p}.tls.cert"), format!("{p}.tls.key"));
        let before = self.issues.len();
        let cert = self.readable_file(&cp, &t.cert);
        let key = self.readable_file(&kp, &t.key);
        if self.issues.len() == before {
            self.cert_pair(&cp, &kp, &cert, &key, "certificate");
        }
        let client_ca = t.client_ca.as_ref().map(|c| {
            let path = format!("{p}.tls.client_ca");
            self.ca_file(&path, c)
        });
        let handshake_timeout = t.handshake_timeout.unwrap_or(Dur(Duration::from_secs(10)));
        if handshake_timeout.0.is_zero() {
            self.error(
                &format!("{p}.tls.handshake_timeout"),
                "must be greater than 0s",
            );
        }
        let max_handshakes =
            self.positive(&format!("{p}.tls.max_handshakes"), t.max_handshakes, 1024);
        let hp = format!("{p}.tls.forward_client_identity_header");
        let forward_client_identity_header =
            t.forward_client_identity_header
                .as_ref()
                .and_then(|h| match HeaderName::from_bytes(h.as_bytes()) {
                    Ok(name) if RESERVED_HEADERS.contains(&name.as_str()) => {
                        self.error(
                            &hp,
                            format!("`{h}` is a header Spillway or HTTP itself manages; name a header of your own, e.g. `x-client-identity`"),
                        );
                        None
                    }
                    Ok(name) => {
                        if client_ca.is_none() {
                            self.error(
                                &hp,
                                "forwarding the client identity needs `client_ca` (without it no client certificate is asked for)",
                            );
                        }
                        Some(name)
                    }
                    Err(_) => {
                        self.error(&hp, format!("`{h}` is not a valid header name"));
                        None
                    }
                });
        ListenerTls {
            cert,
            key,
            client_ca,
            handshake_timeout,
            max_handshakes,
            forward_client_identity_header,
        }
    }

    /// `upstreams.NAME.tls`: server name valid, CA and client certificate usable.
    pub(super) fn upstream_tls(&mut self, p: &str, t: &RawUpstreamTls) -> UpstreamTls {
        if let Some(n) = &t.server_name {
            if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
                self.error(
                    &format!("{p}.tls.server_name"),
                    format!("`{n}` is not a DNS name or IP address"),
                );
            }
        }
        let ca = t.ca.as_ref().map(|c| {
            let path = format!("{p}.tls.ca");
            self.ca_file(&path, c)
        });
        let (cp, kp) = (
            format!("{p}.tls.client_cert"),
            format!("{p}.tls.client_key"),
        );
        let before = self.issues.len();
        let client_cert = t.client_cert.as_ref().map(|c| self.readable_file(&cp, c));
        let client_key = t.client_key.as_ref().map(|k| self.readable_file(&kp, k));
        if let (Some(c), Some(k)) = (&client_cert, &client_key) {
            if self.issues.len() == before {
                self.cert_pair(&cp, &kp, c, k, "client certificate");
            }
        }
        UpstreamTls {
            server_name: t.server_name.clone(),
            ca,
            client_cert,
            client_key,
        }
    }

    /// A certificate and its key: parse, match, validity period.
    pub(super) fn cert_pair(&mut self, cp: &str, kp: &str, cert: &Path, key: &Path, what: &str) {
        use crate::tls;
        match tls::load_pair(cert, key) {
            Err(tls::PairError::Cert(m)) => self.error(cp, m),
            Err(tls::PairError::Key(m)) => self.error(kp, m),
            Ok(pair) => {
                let what = format!("{what} `{}`", cert.display());
                match tls::judge_expiry(&what, &pair.info, tls::now_unix()) {
                    Err(m) => self.error(cp, m),
                    Ok(Some(w)) => self.warn(cp, w),
                    Ok(None) => {}
                }
            }
        }
    }

    /// A CA bundle: readable, and every certificate in it parses.
    pub(super) fn ca_file(&mut self, path: &str, file: &str) -> PathBuf {
        let before = self.issues.len();
        let pb = self.readable_file(path, file);
        if self.issues.len() == before {
            if let Err(m) = crate::tls::load_roots(&pb) {
                self.error(path, m);
            }
        }
        pb
    }
}
