//! Raw -> typed config. Collects every problem before giving up, each with the
//! field path and the line and column it is written at.

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use super::locate::{self, Locations};
use super::schema::*;
use super::*;

mod listeners;
mod overload;
mod routes;
mod upstreams;

const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// `queue.max_wait` when unset, lowered to `timeouts.request` when that is shorter.
const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);
/// `retries.backoff.max` when unset, raised to `retries.backoff.base` when that is longer.
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Bounds the re-parses that find every deserialization problem in a file.
const MAX_PARSE_PASSES: usize = 64;

/// Headers an identity header must not be: HTTP framing and the forwarding
/// headers Spillway sets itself.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "content-length",
    "content-type",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "grpc-timeout",
];

/// Parse and validate; the single path shared by `check`, `run` and reload.
/// Compiled `path_regex`es by source, kept from one load to the next so a
/// reload compiles only patterns it has not seen (compiling is most of the
/// cost of a regex-heavy file). Bounded: entries not used by the latest
/// successful load are dropped ([`keep_regexes`]).
const MAX_CACHED_REGEXES: usize = 4096;
static REGEXES: parking_lot::Mutex<Option<HashMap<String, regex::Regex>>> =
    parking_lot::const_mutex(None);

/// Checks a pattern as written, then compiles it anchored to the whole path.
fn compile_path_regex(source: &str) -> Result<regex::Regex, String> {
    if let Some(re) = REGEXES.lock().as_ref().and_then(|m| m.get(source)) {
        return Ok(re.clone());
    }
    let build = |pattern: &str| {
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| {
                e.to_string()
                    .lines()
                    .last()
                    .unwrap_or("invalid")
                    .trim()
                    .to_string()
            })
    };
    // The pattern alone must compile: wrapping could otherwise make a
    // fragment like `a)|(b` valid.
    build(source)?;
    let anchored = build(&format!("^(?:{source})$"))?;
    let mut cache = REGEXES.lock();
    let map = cache.get_or_insert_with(HashMap::new);
    // Failed loads add entries that only the next good one prunes: a bound.
    if map.len() >= MAX_CACHED_REGEXES {
        map.clear();
    }
    map.insert(source.to_string(), anchored.clone());
    Ok(anchored)
}

/// Keeps exactly the regexes of the config that loaded.
fn keep_regexes(config: &Config) {
    let used: HashSet<&str> = config
        .routes
        .iter()
        .filter_map(|r| match &r.matcher.path {
            PathMatch::Regex(x) => Some(x.source.as_str()),
            _ => None,
        })
        .collect();
    if let Some(map) = REGEXES.lock().as_mut() {
        map.retain(|source, _| used.contains(source.as_str()));
    }
}

/// Parses and validates `text` from `file`: the config with its warnings, or every problem.
pub(super) fn load(text: &str, file: &str) -> Result<Loaded, ConfigError> {
    let mut v = Validator {
        file: file.to_string(),
        text,
        locs: OnceCell::new(),
        issues: Vec::new(),
        warnings: Vec::new(),
        blanked_values: Vec::new(),
    };
    if text.trim().is_empty() {
        v.error(
            "",
            "the file is empty: a config needs at least `version: 1` and one listener",
        );
        return Err(v.into_error());
    }
    let raw = match v.parse(text) {
        Some(raw) => raw,
        None => return Err(v.into_error()),
    };
    let before = v.issues.len();
    let config = v.config(&raw, text);
    // A field blanked for its bad value reads as missing; that is the same
    // problem again, already reported.
    let semantic = v.issues.split_off(before);
    let blanked = std::mem::take(&mut v.blanked_values);
    v.issues.extend(semantic.into_iter().filter(|issue| {
        !blanked.iter().any(|b| {
            let field = b.rsplit(['.', '[']).next().unwrap_or(b);
            locate::parent(b) == Some(issue.path.as_str())
                && issue
                    .message
                    .starts_with(&format!("missing field `{field}`"))
        })
    }));
    match config {
        Some(config) if v.issues.is_empty() => {
            keep_regexes(&config);
            Ok(Loaded {
                config,
                warnings: {
                    let mut w = v.warnings;
                    dedup(&mut w);
                    w
                },
            })
        }
        _ => Err(v.into_error()),
    }
}

struct Validator<'a> {
    file: String,
    text: &'a str,
    /// Paths -> positions: a second walk over the YAML, paid only when an
    /// issue or warning needs a position (a valid file, i.e. nearly every
    /// reload, never builds it).
    locs: OnceCell<Locations>,
    issues: Vec<ConfigIssue>,
    warnings: Vec<ConfigIssue>,
    /// Fields [`Validator::parse`] blanked out for a bad value.
    blanked_values: Vec<String>,
}

impl Validator<'_> {
    fn locs(&self) -> &Locations {
        self.locs.get_or_init(|| Locations::build(self.text))
    }

    fn issue(&self, path: &str, message: String) -> ConfigIssue {
        let pos = self.locs().value(path);
        ConfigIssue {
            file: self.file.clone(),
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
            path: path.to_string(),
            message,
        }
    }

    fn error(&mut self, path: &str, message: impl Into<String>) {
        let issue = self.issue(path, message.into());
        self.issues.push(issue);
    }

    fn warn(&mut self, path: &str, message: impl Into<String>) {
        let issue = self.issue(path, message.into());
        self.warnings.push(issue);
    }

    fn into_error(mut self) -> ConfigError {
        // In file order, so the list reads top to bottom like the file.
        self.issues
            .sort_by_key(|i| (i.line.unwrap_or(0), i.column.unwrap_or(0)));
        dedup(&mut self.issues);
        ConfigError {
            issues: self.issues,
        }
    }

    /// Deserializes the raw config. The deserializer stops at its first
    /// error; to report every problem in one run, each error is recorded and
    /// the field it is about is blanked out (spaces, so every other line and
    /// column stays where it is), then the text is parsed again, at most
    /// [`MAX_PARSE_PASSES`] times. The config that finally deserializes still
    /// gets the semantic checks; it cannot load, as errors were recorded.
    /// `None` when the text cannot be deserialized even so (a YAML syntax
    /// error, or a problem that blanking cannot remove).
    fn parse(&mut self, text: &str) -> Option<RawConfig> {
        // A copy only once something is blanked: a valid file parses once.
        let mut blanked: Option<String> = None;
        for _ in 0..MAX_PARSE_PASSES {
            let current = blanked.as_deref().unwrap_or(text);
            let e = match serde_saphyr::from_str::<RawConfig>(current) {
                Ok(raw) => return Some(raw),
                Err(e) => e,
            };
            // The anchor was in a blanked field: a consequence as well.
            if blanked.is_some()
                && matches!(
                    e.without_snippet(),
                    serde_saphyr::Error::UnknownAnchor { .. }
                )
            {
                return None;
            }
            if let serde_saphyr::Error::SerdeMissingField { field, .. } = e.without_snippet() {
                // A field blanked for a bad value: a consequence, not another problem.
                let consequence = self
                    .blanked_values
                    .iter()
                    .any(|p| p.rsplit(['.', '[']).next() == Some(*field));
                if consequence {
                    return None;
                }
            }
            let path = self.deserialize_error(&e, text)?;
            // Positions of the blanked text are those of the original.
            let locs = Locations::build(current);
            let entry = match e.without_snippet() {
                serde_saphyr::Error::SerdeUnknownField { .. } => {
                    let loc = e.location()?;
                    locs.key_at(loc.line(), loc.column())
                }
                _ => {
                    let entry = locs.entry(&path);
                    if let Some(e) = entry {
                        self.blanked_values.push(e.path.clone());
                    }
                    entry
                }
            };
            let entry = entry?;
            // A block mapping left with no key would read as null (e.g. a
            // list item that is no longer a mapping): it becomes `{}`.
            let empty = entry.block && locs.siblings(entry) == 1;
            let current = blanked.get_or_insert_with(|| text.to_string());
            if !blank(current, entry.span.clone(), empty) {
                return None;
            }
        }
        None
    }

    /// Records a YAML or schema error from the deserializer. Returns the field
    /// path when the error is about one field's key or value (so the parse can
    /// go on without it); `None` when it is not (e.g. a syntax error).
    fn deserialize_error(&mut self, e: &serde_saphyr::Error, text: &str) -> Option<String> {
        use serde_saphyr::Error as E;
        let loc = e.location();
        let (line, column) = match loc {
            Some(l) if l.line() > 0 => (Some(l.line()), Some(l.column())),
            _ => (None, None),
        };
        let at = |v: &Self| match (line, column) {
            (Some(l), Some(c)) => v.locs().path_at(l, c).unwrap_or("").to_string(),
            _ => String::new(),
        };
        let (path, message, field_path) = match e.without_snippet() {
            E::SerdeUnknownField {
                field, expected, ..
            } => {
                let mut m = format!("unknown field `{field}`");
                match did_you_mean(field, expected.iter().copied()) {
                    Some(s) => m.push_str(&format!(" (did you mean `{s}`?)")),
                    None => m.push_str(&format!(", expected one of: {}", expected.join(", "))),
                }
                // The error points at the key: the path is the mapping holding it.
                let key = match (line, column) {
                    (Some(l), Some(c)) => self.locs().key_at(l, c).map(|k| k.path.clone()),
                    _ => None,
                };
                let path = match &key {
                    Some(k) => locate::parent(k).unwrap_or("").to_string(),
                    None => {
                        let near = at(self);
                        near.rsplit_once('.')
                            .map(|(p, last)| if last == *field { p } else { near.as_str() })
                            .unwrap_or(if near == *field { "" } else { near.as_str() })
                            .to_string()
                    }
                };
                (path, m, key)
            }
            E::InvalidScalar { ty, .. } => {
                let got = match (line, column) {
                    (Some(l), Some(c)) => scalar_at(text, l, c),
                    _ => String::new(),
                };
                let path = at(self);
                let message = format!("expected {}, got `{got}`", human_type(ty));
                (path.clone(), message, Some(path))
            }
            other @ (E::Message { .. }
            | E::SerdeInvalidType { .. }
            | E::SerdeInvalidValue { .. }
            | E::SerdeInvalidLength { .. }
            | E::SerdeUnknownVariant { .. }
            | E::NullIntoString { .. }
            | E::InvalidBooleanStrict { .. }
            | E::NonFiniteFloat { .. }) => {
                let path = at(self);
                let field = (line.is_some() && !path.is_empty()).then(|| path.clone());
                (path, strip_location(&other.to_string()), field)
            }
            other => (at(self), strip_location(&other.to_string()), None),
        };
        self.issues.push(ConfigIssue {
            file: self.file.clone(),
            line,
            column,
            path,
            message,
        });
        field_path
    }

    // === the whole file ===

    fn config(&mut self, raw: &RawConfig, text: &str) -> Option<Config> {
        match raw.version {
            Some(1) => {}
            Some(n) => self.error(
                "version",
                format!("unsupported version {n}: this Spillway reads `version: 1`"),
            ),
            None => self.error("", "missing `version: 1` at the top of the file"),
        }
        if raw.listeners.is_empty() {
            self.error(
                "listeners",
                "at least one listener is required (e.g. `- {name: inbound, bind: 0.0.0.0:8080}`)",
            );
        }
        let listeners = self.listeners(&raw.listeners);
        let admin = AdminConfig {
            bind: self
                .socket_addr(
                    "admin.bind",
                    raw.admin.bind.as_deref().unwrap_or("127.0.0.1:9901"),
                )
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901))),
        };
        let runtime = RuntimeConfig {
            worker_threads: match &raw.runtime.worker_threads {
                None => None,
                Some(RawThreads::Word(w)) if w == "auto" => None,
                Some(RawThreads::Count(n)) if (1..=1024).contains(n) => Some(*n as usize),
                Some(_) => {
                    self.error(
                        "runtime.worker_threads",
                        "expected `auto` or a number from 1 to 1024",
                    );
                    None
                }
            },
        };
        let limits = LimitsConfig {
            max_in_flight: self.positive("limits.max_in_flight", raw.limits.max_in_flight, 4096),
        };
        let drain = DrainConfig {
            grace: raw.drain.grace.unwrap_or(Dur(Duration::from_secs(5))),
            timeout: raw.drain.timeout.unwrap_or(Dur(Duration::from_secs(30))),
        };
        let upstreams: Vec<UpstreamConfig> = raw
            .upstreams
            .iter()
            .map(|(name, u)| self.upstream(name, u))
            .collect();
        if raw.routes.is_empty() {
            self.warn("routes", "no routes: every request will get 404 no_route");
        }
        let defaults = raw.defaults.clone().unwrap_or_default();
        if defaults.name.is_some() {
            self.error(
                "defaults.name",
                "`defaults` cannot set `name`: names are per route",
            );
        }
        if defaults.matcher.is_some() {
            self.error(
                "defaults.match",
                "`defaults` cannot set `match`: matches are per route",
            );
        }
        let upstream_names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
        let mut routes = Vec::with_capacity(raw.routes.len());
        let mut seen = HashSet::new();
        for (i, r) in raw.routes.iter().enumerate() {
            if let Some(route) = self.route(i, r, &defaults, &upstream_names) {
                if !seen.insert(route.name.clone()) {
                    self.error(
                        &format!("routes[{i}].name"),
                        format!(
                            "duplicate route name `{}`: route names must be unique",
                            route.name
                        ),
                    );
                }
                routes.push(route);
            }
        }
        self.shadowed(&routes);
        let mtls = listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.client_ca.is_some()));
        for (i, r) in routes.iter().enumerate() {
            if !mtls
                && matches!(
                    r.fairness.as_ref().map(|f| &f.key),
                    Some(FairKey::ClientIdentity)
                )
            {
                self.error(
                    &format!("routes[{i}].fairness.key.client_identity"),
                    "a client identity needs a listener with `tls.client_ca` (without it no client certificate is verified)",
                );
            }
        }
        Some(Config {
            version: 1,
            listeners,
            admin,
            runtime,
            limits,
            drain,
            upstreams,
            routes,
            source: SourceInfo {
                file: self.file.clone(),
                hash: content_hash(text.as_bytes()),
            },
        })
    }

    // === checks shared by sections ===

    fn shadowed(&mut self, routes: &[RouteConfig]) {
        for (j, later) in routes.iter().enumerate() {
            if let Some((i, earlier)) = routes[..j]
                .iter()
                .enumerate()
                .find(|(_, e)| covers(&e.matcher, &later.matcher))
            {
                self.warn(
                    &format!("routes[{j}].match"),
                    format!(
                        "route `{}` can never match: route `{}` (routes[{i}]) comes first and matches everything it does",
                        later.name, earlier.name
                    ),
                );
            }
        }
    }

    fn header_list(
        &mut self,
        p: &str,
        raw: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::new();
        for (k, v) in raw.into_iter().flatten() {
            match (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                (Ok(name), Ok(value)) => out.push((name, value)),
                (Err(_), _) => self.error(
                    &format!("{p}.{k}"),
                    format!("`{k}` is not a valid header name"),
                ),
                (_, Err(_)) => self.error(
                    &format!("{p}.{k}"),
                    "header value has characters HTTP does not allow",
                ),
            }
        }
        out
    }

    fn socket_addr(&mut self, path: &str, s: &str) -> Option<SocketAddr> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let hint = if s.starts_with("localhost:") {
                    " (use 127.0.0.1 instead of localhost)"
                } else if s.starts_with(':') {
                    " (write 0.0.0.0:PORT)"
                } else {
                    ""
                };
                self.error(
                    path,
                    format!("expected `ip:port` such as `0.0.0.0:8080`, got `{s}`{hint}"),
                );
                None
            }
        }
    }

    fn readable_file(&mut self, path: &str, file: &str) -> PathBuf {
        let pb = PathBuf::from(file);
        if let Err(e) = std::fs::File::open(&pb) {
            self.error(path, format!("cannot read `{file}`: {e}"));
        }
        pb
    }

    fn positive(&mut self, path: &str, v: Option<u64>, default: usize) -> usize {
        match v {
            None => default,
            Some(0) => {
                self.error(path, "must be at least 1");
                default
            }
            Some(n) => n.min(1 << 30) as usize,
        }
    }

    fn positive_u32(&mut self, path: &str, v: Option<u64>, default: u32) -> u32 {
        match v {
            None => default,
            Some(0) => {
                self.error(path, "must be at least 1");
                default
            }
            Some(n) => n.min(u64::from(u32::MAX)) as u32,
        }
    }

    fn one_of(&mut self, path: &str, got: &str, allowed: &[&str]) {
        let hint = match did_you_mean(got, allowed.iter().copied()) {
            Some(s) => format!(" (did you mean `{s}`?)"),
            None => String::new(),
        };
        self.error(
            path,
            format!("expected one of {}, got `{got}`{hint}", allowed.join(" | ")),
        );
    }
}

/// Takes a route field from the route, else from `defaults`; returns the path it came from.
fn pick<T>(
    i: usize,
    r: &RawRoute,
    d: &RawRoute,
    f: impl Fn(&RawRoute) -> Option<T>,
    sub: &str,
) -> (Option<T>, String) {
    match f(r) {
        Some(v) => (Some(v), format!("routes[{i}].{sub}")),
        None => match f(d) {
            Some(v) => (Some(v), format!("defaults.{sub}")),
            None => (None, format!("routes[{i}].{sub}")),
        },
    }
}

/// A route field as the user wrote it: relative to the route for its own
/// fields (`queue.max_wait`), the full path for one from `defaults:`
/// (`defaults.queue.max_wait`).
fn field_name(i: usize, path: &str) -> &str {
    let own = format!("routes[{i}].");
    match path.strip_prefix(own.as_str()) {
        Some(_) => &path[own.len()..],
        None => path,
    }
}

/// Does `a` match every request `b` matches?
fn covers(a: &MatchConfig, b: &MatchConfig) -> bool {
    let methods = match (&a.methods, &b.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(am), Some(bm)) => bm.iter().all(|m| am.contains(m)),
    };
    let host = a.host.is_none() || a.host == b.host;
    let headers = a.headers.iter().all(|h| b.headers.contains(h));
    let path = match (&a.path, &b.path) {
        (PathMatch::Any, _) => true,
        (PathMatch::Prefix(p), PathMatch::Prefix(q))
        | (PathMatch::Prefix(p), PathMatch::Exact(q)) => q.starts_with(p.as_str()),
        (PathMatch::Exact(p), PathMatch::Exact(q)) => p == q,
        (PathMatch::Regex(p), PathMatch::Regex(q)) => p == q,
        _ => false,
    };
    methods && host && headers && path
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_endpoint(ep: &str) -> Result<(), String> {
    if ep.contains("://") {
        return Err(format!(
            "expected `host:port` without a scheme, got `{ep}` (TLS is set with `tls:`)"
        ));
    }
    let Some((host, port)) = ep.rsplit_once(':') else {
        return Err(format!(
            "expected `host:port`, got `{ep}` (the port is required)"
        ));
    };
    if host.is_empty() {
        return Err(format!(
            "expected `host:port`, got `{ep}` (the host is missing)"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{port}` is not a port number in `{ep}`")),
    }
}

/// The closest candidate within a small edit distance.
pub(crate) fn did_you_mean<'a>(
    got: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (got.len() / 3).max(2);
    candidates
        .map(|c| (levenshtein(got, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j + 1] + 1).min(cur[j] + 1).min(prev[j] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// A `defaults:` value is checked once per route: say each problem once.
fn dedup(issues: &mut Vec<ConfigIssue>) {
    let mut seen = HashSet::new();
    issues.retain(|i| seen.insert(i.clone()));
}

/// Replaces the text in `span` with spaces (line breaks kept, one space per
/// character so columns stay put), and a `,` right after it, so that a flow
/// mapping stays valid; with `empty_map`, the first two become `{}`. False if
/// nothing was left to blank.
fn blank(text: &mut String, span: std::ops::Range<usize>, empty_map: bool) -> bool {
    let (Some(before), Some(region)) = (text.get(..span.start), text.get(span.clone())) else {
        return false;
    };
    if region.trim().is_empty() {
        return false;
    }
    let mut after = &text[span.end..];
    let trimmed = after.trim_start_matches([' ', '\t']);
    let comma = trimmed.starts_with(',');
    let gap = after.len() - trimmed.len();
    let mut replaced: String = region
        .chars()
        .map(|c| if c == '\n' || c == '\r' { c } else { ' ' })
        .collect();
    // A key and its `:` are at least two characters on the first line.
    if empty_map && replaced.starts_with("  ") {
        replaced.replace_range(..2, "{}");
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(before);
    out.push_str(&replaced);
    if comma {
        out.push_str(&after[..gap]);
        out.push(' ');
        after = &trimmed[1..];
    }
    out.push_str(after);
    *text = out;
    true
}

/// The plain scalar written at a 1-based line and column (to quote it back).
fn scalar_at(text: &str, line: u64, column: u64) -> String {
    let Some(l) = text.lines().nth(line.saturating_sub(1) as usize) else {
        return String::new();
    };
    let rest: String = l.chars().skip(column.saturating_sub(1) as usize).collect();
    let end = rest.find([',', '}', ']', '#']).unwrap_or(rest.len());
    rest[..end]
        .trim()
        .trim_matches(['"', '\''])
        .chars()
        .take(60)
        .collect()
}

/// What a Rust scalar type means to someone writing YAML.
fn human_type(ty: &str) -> &'static str {
    match ty {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "bool" => "true or false",
        "char" => "a single character",
        _ => "a different kind of value",
    }
}

/// serde-saphyr messages may end with "at line X column Y"; we print the position ourselves.
fn strip_location(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or(msg);
    match first.find(" at line ") {
        Some(i) => first[..i].to_string(),
        None => first.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("max_in_flite", ["max_in_flight", "queue"].into_iter()),
            Some("max_in_flight")
        );
        assert_eq!(did_you_mean("zzz", ["max_in_flight"].into_iter()), None);
    }

    #[test]
    fn blanking_keeps_positions_and_flow_syntax() {
        let text = "a: {x: 1, bad: [1, 2], y: é}\nb:\n  bad:\n    - q\n  c: 3\n";
        let locs = Locations::build(text);
        let mut t = text.to_string();
        let flow = locs.entry("a.bad").expect("a.bad").span.clone();
        assert_eq!(&text[flow.clone()], "bad: [1, 2]");
        assert!(blank(&mut t, flow.clone(), false));
        let block = locs.entry("b.bad").expect("b.bad").span.clone();
        assert_eq!(&text[block.clone()], "bad:\n    - q");
        assert!(blank(&mut t, block.clone(), false));
        assert_eq!(
            t,
            "a: {x: 1,              y: é}\nb:\n      \n       \n  c: 3\n"
        );
        // Still YAML, and what is left is where it was.
        let after = Locations::build(&t);
        let (p, q) = (locs.value("a.y").unwrap(), after.value("a.y").unwrap());
        assert_eq!((p.line, p.column), (q.line, q.column));
        let (p, q) = (locs.value("b.c").unwrap(), after.value("b.c").unwrap());
        assert_eq!((p.line, p.column), (q.line, q.column));
        assert!(after.key_at(3, 3).is_none());
        assert!(after.key_at(1, 11).is_none());
        // Nothing left to blank.
        assert!(!blank(&mut t, block, false));

        // A list item's only key: the item stays a (now empty) mapping.
        let text = "l:\n  - bad: 1\n  - ok: 2\n";
        let locs = Locations::build(text);
        let e = locs.key_at(2, 5).expect("bad");
        assert!(e.block);
        assert_eq!(locs.siblings(e), 1);
        let mut t = text.to_string();
        assert!(blank(&mut t, e.span.clone(), true));
        assert_eq!(t, "l:\n  - {}    \n  - ok: 2\n");
        assert!(
            !Locations::build("a: {b: 1}")
                .entry("a.b")
                .expect("a.b")
                .block
        );
    }

    #[test]
    fn path_regex_is_checked_as_written_and_anchored() {
        // Valid only once wrapped in `^(?:...)$`: must still be refused.
        assert!(compile_path_regex("a)|(b").is_err());
        let re = compile_path_regex("/items/[0-9]+").expect("compiles");
        assert!(re.is_match("/items/42"));
        assert!(!re.is_match("/x/items/42"));
        assert!(!re.is_match("/items/42/more"));
        // A second compile of the same source (the next reload) agrees.
        let again = compile_path_regex("/items/[0-9]+").expect("compiles");
        assert_eq!(again.as_str(), re.as_str());
    }
}
