//! `upstreams.<name>` and their circuit breakers.

use super::*;

impl Validator<'_> {
    /// Validates `upstreams.<name>`, filling defaults; records problems, builds a value anyway.
    pub(super) fn upstream(&mut self, name: &str, u: &RawUpstream) -> UpstreamConfig {
        let p = format!("upstreams.{name}");
        if !valid_name(name) {
            self.error(&p, format!("upstream name `{name}` must be 1-64 characters of letters, digits, `-`, `_` or `.`"));
        }
        if u.endpoints.is_empty() {
            self.error(
                &format!("{p}.endpoints"),
                "at least one endpoint (`host:port`) is required",
            );
        }
        for (i, ep) in u.endpoints.iter().enumerate() {
            if let Err(m) = check_endpoint(ep) {
                self.error(&format!("{p}.endpoints[{i}]"), m);
            }
        }
        let protocol = match u.protocol.as_deref() {
            None | Some("http1") => UpstreamProtocol::Http1,
            Some("http2") => UpstreamProtocol::Http2,
            Some(other) => {
                self.one_of(&format!("{p}.protocol"), other, &["http1", "http2"]);
                UpstreamProtocol::Http1
            }
        };
        let tls = u.tls.as_ref().map(|t| {
            if t.client_cert.is_some() != t.client_key.is_some() {
                self.error(
                    &format!("{p}.tls"),
                    "`client_cert` and `client_key` must be set together",
                );
            }
            self.upstream_tls(&p, t)
        });
        let connect_timeout = u.connect_timeout.unwrap_or(Dur(Duration::from_secs(1)));
        if connect_timeout.0.is_zero() {
            self.error(&format!("{p}.connect_timeout"), "must be greater than 0s");
        }
        let pool = u.pool.as_ref();
        let pool = PoolConfig {
            max_idle_per_endpoint: pool
                .and_then(|p| p.max_idle_per_endpoint)
                .map(|n| n.min(1 << 20) as usize)
                .unwrap_or(64),
            idle_timeout: pool
                .and_then(|p| p.idle_timeout)
                .unwrap_or(Dur(Duration::from_secs(90))),
        };
        let circuit_breaker = u
            .circuit_breaker
            .as_ref()
            .map(|b| self.breaker(&format!("{p}.circuit_breaker"), b));
        UpstreamConfig {
            name: name.to_string(),
            endpoints: u.endpoints.clone(),
            tls,
            connect_timeout,
            pool,
            protocol,
            circuit_breaker,
        }
    }

    /// Validates a `circuit_breaker:` block at path `p`, filling defaults.
    pub(super) fn breaker(&mut self, p: &str, b: &RawBreaker) -> BreakerSettings {
        let failure_rate = b.failure_rate.as_ref().map(|r| {
            if !(r.threshold > 0.0 && r.threshold <= 1.0) {
                self.error(
                    &format!("{p}.failure_rate.threshold"),
                    "expected a fraction in (0, 1], e.g. 0.5",
                );
            }
            let window = r.window.unwrap_or(Dur(Duration::from_secs(10)));
            if window.0 < Duration::from_secs(1) {
                self.error(&format!("{p}.failure_rate.window"), "expected at least 1s");
            }
            FailureRateSettings {
                threshold: r.threshold,
                window,
                min_requests: self.positive_u32(
                    &format!("{p}.failure_rate.min_requests"),
                    r.min_requests,
                    20,
                ),
            }
        });
        let mut failure_on = FailureOn {
            connect: true,
            timeout: true,
            status_5xx: true,
        };
        if let Some(list) = &b.failure_on {
            failure_on = FailureOn {
                connect: false,
                timeout: false,
                status_5xx: false,
            };
            for (i, item) in list.iter().enumerate() {
                match item.as_str() {
                    "connect" => failure_on.connect = true,
                    "timeout" => failure_on.timeout = true,
                    "5xx" => failure_on.status_5xx = true,
                    other => self.one_of(
                        &format!("{p}.failure_on[{i}]"),
                        other,
                        &["connect", "timeout", "5xx"],
                    ),
                }
            }
        }
        let recovery_timeout = b.recovery_timeout.unwrap_or(Dur(Duration::from_secs(30)));
        if recovery_timeout.0.is_zero() {
            self.error(&format!("{p}.recovery_timeout"), "must be greater than 0s");
        }
        BreakerSettings {
            failure_threshold: self.positive_u32(
                &format!("{p}.failure_threshold"),
                b.failure_threshold,
                5,
            ),
            failure_rate,
            recovery_timeout,
            half_open_calls: self.positive_u32(
                &format!("{p}.half_open_calls"),
                b.half_open_calls,
                3,
            ),
            failure_on,
            mode: self.mode(&format!("{p}.mode"), b.mode.as_deref()),
        }
    }
}
