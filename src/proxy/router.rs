//! First-match route table, compiled once per config. Matching allocates
//! nothing: prefixes and exact paths compare bytes, hosts compare
//! case-insensitively, regexes are pre-compiled and anchored to the whole path
//! (as Envoy's `safe_regex` is).

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use regex::Regex;

use crate::config::{MatchConfig, PathMatch, RouteConfig};

/// The compiled table: route indexes in config order.
pub struct Router {
    entries: Vec<Compiled>,
}

struct Compiled {
    path: CompiledPath,
    methods: Option<Vec<Method>>,
    host: Option<HostMatch>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

enum CompiledPath {
    Any,
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

enum HostMatch {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

// === impl Router ===

impl Router {
    /// Builds the table; regexes come compiled from validation.
    pub fn new(routes: &[RouteConfig]) -> Self {
        Router {
            entries: routes.iter().map(|r| Compiled::new(&r.matcher)).collect(),
        }
    }

    /// Index of the first route matching the request.
    pub fn route<B>(&self, req: &Request<B>) -> Option<usize> {
        let path = req.uri().path();
        let host = request_host(req);
        self.entries
            .iter()
            .position(|e| e.matches(req.method(), path, host, req.headers()))
    }
}

/// The request's host without port: `:authority` (h2, absolute-form) or `Host`.
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => req.headers().get(http::header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        // [v6]:port
        return h.split_once(']').map_or(h, |(a, _)| &a[1..]);
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

impl Compiled {
    fn new(m: &MatchConfig) -> Self {
        let path = match &m.path {
            PathMatch::Any => CompiledPath::Any,
            PathMatch::Prefix(p) => CompiledPath::Prefix(p.clone()),
            PathMatch::Exact(p) => CompiledPath::Exact(p.clone()),
            // Compiled (anchored) by validation; a clone shares it.
            PathMatch::Regex(r) => CompiledPath::Regex(r.anchored.clone()),
        };
        let host = m.host.as_ref().map(|h| match h.strip_prefix('*') {
            Some(suffix) => HostMatch::Suffix(suffix.to_string()),
            None => HostMatch::Exact(h.clone()),
        });
        Compiled {
            path,
            methods: m.methods.clone(),
            host,
            headers: m.headers.clone(),
        }
    }

    fn matches(
        &self,
        method: &Method,
        path: &str,
        host: Option<&str>,
        headers: &HeaderMap,
    ) -> bool {
        let path_ok = match &self.path {
            CompiledPath::Any => true,
            CompiledPath::Prefix(p) => path.starts_with(p.as_str()),
            CompiledPath::Exact(p) => path == p,
            CompiledPath::Regex(re) => re.is_match(path),
        };
        if !path_ok {
            return false;
        }
        if let Some(ms) = &self.methods {
            if !ms.contains(method) {
                return false;
            }
        }
        if let Some(hm) = &self.host {
            let Some(h) = host else { return false };
            let ok = match hm {
                HostMatch::Exact(e) => h.eq_ignore_ascii_case(e),
                HostMatch::Suffix(s) => {
                    h.len() > s.len()
                        && h.is_char_boundary(h.len() - s.len())
                        && h[h.len() - s.len()..].eq_ignore_ascii_case(s)
                }
            };
            if !ok {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(k, v)| headers.get_all(k).iter().any(|have| have == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn router(routes: &str) -> (Router, Vec<String>) {
        let y = format!(
            "version: 1\nlisteners: [{{name: l, bind: \"127.0.0.1:0\"}}]\nupstreams: {{app: {{endpoints: [\"127.0.0.1:1\"]}}}}\nroutes:\n{routes}"
        );
        let loaded = load_str(&y, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let names = loaded
            .config
            .routes
            .iter()
            .map(|r| r.name.clone())
            .collect();
        (Router::new(&loaded.config.routes), names)
    }

    fn pick(
        r: &(Router, Vec<String>),
        method: &str,
        uri: &str,
        host: &str,
        hdr: Option<(&str, &str)>,
    ) -> Option<String> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", host);
        if let Some((k, v)) = hdr {
            b = b.header(k, v);
        }
        let req = b.body(()).unwrap();
        r.0.route(&req).map(|i| r.1[i].clone())
    }

    #[test]
    fn first_match_wins() {
        let r = router(
            "  - {name: exact, match: {path_exact: /a}, upstream: app}\n  - {name: api-get, match: {path_prefix: /api, methods: [GET]}, upstream: app}\n  - {name: hosted, match: {path_prefix: /, host: \"*.example.com\"}, upstream: app}\n  - {name: re, match: {path_regex: \"/u/[0-9]+\"}, upstream: app}\n  - {name: hdr, match: {path_prefix: /h, headers: {x-tenant: blue}}, upstream: app}\n",
        );
        assert_eq!(pick(&r, "GET", "/a", "x", None).as_deref(), Some("exact"));
        assert_eq!(pick(&r, "GET", "/a/b", "x", None), None);
        assert_eq!(
            pick(&r, "GET", "/api/x?q=1", "x", None).as_deref(),
            Some("api-get")
        );
        assert_eq!(pick(&r, "POST", "/api/x", "x", None), None);
        assert_eq!(
            pick(&r, "POST", "/api/x", "a.Example.com:8080", None).as_deref(),
            Some("hosted")
        );
        assert_eq!(pick(&r, "POST", "/api/x", "example.com", None), None);
        assert_eq!(pick(&r, "GET", "/u/42", "x", None).as_deref(), Some("re"));
        assert_eq!(pick(&r, "GET", "/u/42/x", "x", None), None);
        assert_eq!(
            pick(&r, "GET", "/h", "x", Some(("x-tenant", "blue"))).as_deref(),
            Some("hdr")
        );
        assert_eq!(pick(&r, "GET", "/h", "x", Some(("x-tenant", "red"))), None);
    }

    #[test]
    fn ports_and_v6() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
