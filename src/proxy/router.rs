//! First-match route table, compiled once per config.
//!
//! A request gets the first route, in config order, whose every condition
//! holds: path (`path_prefix`, `path_exact`, or `path_regex` anchored to the
//! whole path, as Envoy's `safe_regex` is), methods, host (exact or
//! `*.suffix`, case-insensitive, port stripped) and exact header matches
//! (any value of a repeated header may match).
//!
//! Matching does not try the routes one by one. The table is indexed:
//!
//! - a byte trie of every path prefix, exact path and regex literal prefix
//!   (what every match of the regex must start with) yields the only routes
//!   the path can match, plus those that match any path (no path condition,
//!   or a regex without a literal prefix such as `.*\.png`);
//! - all `path_regex`es form one multi-pattern regex, run at most once per
//!   request and only when a candidate's other conditions hold;
//! - each distinct header name is looked up once per request, each distinct
//!   host condition decided once (a sorted table of exact hosts and one of
//!   `*.suffix`es, searched with the lowercased request host).
//!
//! Candidates are then checked in config order with those memoized answers,
//! so the first match is the same as a linear scan's. The per-request state
//! (bitsets, the regex's pattern set and search cache) lives in a
//! thread-local scratch sized by the largest table the thread has used: a
//! request allocates nothing. With 200 routes and the request matching the
//! last, routing costs about as much as with one route (docs/benchmarks.md,
//! "Many routes").

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use regex::Regex;
use regex_automata::{meta, Input, MatchKind, PatternID, PatternSet};
use regex_syntax::hir::literal::{ExtractKind, Extractor};

use crate::config::{MatchConfig, PathMatch, RouteConfig};

/// The compiled table.
pub struct Router {
    /// The routes in config order, matched one after another: the reference
    /// the index must agree with, and the fallback when the thread-local
    /// scratch is unavailable (during thread teardown).
    linear: Vec<Compiled>,
    index: Index,
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

/// Marks "no such condition" in [`Entry`]'s id fields.
const NONE: u32 = u32::MAX;

/// Which [`Router`] a thread's regex search cache was made for.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The indexed form of the table.
struct Index {
    /// Unique per router, so a thread-local search cache is never used with
    /// another router's regex.
    id: u64,
    /// One per route, config order.
    routes: Vec<Entry>,
    /// Routes whose path condition holds for any path: none given, or a
    /// regex whose matches need not start with any particular literal.
    always: Vec<u32>,
    trie: Trie,
    regexes: Regexes,
    hosts: Hosts,
    headers: Headers,
}

/// The non-path conditions of one route, as ids into the shared tables.
struct Entry {
    methods: Methods,
    /// Index into [`Hosts`]' conditions, or [`NONE`].
    host: u32,
    /// Pattern id in [`Regexes`], or [`NONE`] (the trie already decided the path).
    regex: u32,
    /// Range of [`Headers::route_pairs`]: every pair must be present.
    headers: (u32, u32),
}

/// A route's `methods:`: standard methods as bits, others listed.
struct Methods {
    /// `None`: any method.
    mask: Option<u16>,
    extension: Box<[Method]>,
}

/// The standard methods, by bit.
const STANDARD_METHODS: [Method; 9] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::HEAD,
    Method::OPTIONS,
    Method::CONNECT,
    Method::PATCH,
    Method::TRACE,
];

fn method_bit(m: &Method) -> Option<u16> {
    STANDARD_METHODS.iter().position(|s| s == m).map(|i| 1 << i)
}

/// Byte trie of prefixes and exact paths, flattened.
struct Trie {
    nodes: Vec<Node>,
    /// Child edges of all nodes, each node's sorted by byte.
    edges: Vec<(u8, u32)>,
    /// Route ids of all nodes.
    ids: Vec<u32>,
}

struct Node {
    edges: (u32, u32),
    /// Routes matching every path that starts with this node's bytes.
    prefix: (u32, u32),
    /// Routes matching only the path equal to this node's bytes.
    exact: (u32, u32),
}

/// The `path_regex`es, one pattern per route that has one.
struct Regexes {
    /// Every pattern at once; `None` if there are none or it failed to build
    /// (then each route's own regex runs).
    set: Option<meta::Regex>,
    each: Vec<Regex>,
}

/// Distinct host conditions, lowercased, each with its id.
struct Hosts {
    count: usize,
    /// Exact hosts, sorted.
    exact: Vec<(Box<[u8]>, u32)>,
    /// `*.suffix` stored as `.suffix`, sorted.
    suffix: Vec<(Box<[u8]>, u32)>,
    /// Suffixes not starting with `.` (validation does not produce them):
    /// compared one by one.
    other: Vec<(Box<[u8]>, u32)>,
}

/// Hosts longer than this are compared condition by condition instead of
/// being lowercased on the stack.
const MAX_INDEXED_HOST: usize = 256;

/// Distinct `(header name, value)` requirements. Pair ids are grouped by
/// name, and a name's values sorted, so one lookup of the name decides all
/// its pairs.
struct Headers {
    names: Vec<HeaderName>,
    /// Per name: its required values, sorted by bytes, with their pair id.
    values: Vec<Vec<(HeaderValue, u32)>>,
    /// Per pair: its name's index.
    pair_name: Vec<u32>,
    /// Per route (ranges in [`Entry::headers`]): the pairs it requires.
    route_pairs: Vec<u32>,
}

/// Per-thread matching state, reused by every request.
struct Scratch {
    candidates: Vec<u64>,
    host_ok: Vec<u64>,
    name_done: Vec<u64>,
    pair_ok: Vec<u64>,
    patterns: PatternSet,
    /// The search cache of the router with this id.
    cache: Option<(u64, meta::Cache)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        candidates: Vec::new(),
        host_ok: Vec::new(),
        name_done: Vec::new(),
        pair_ok: Vec::new(),
        patterns: PatternSet::new(0),
        cache: None,
    });
}

// === impl Router ===

impl Router {
    /// Builds the table; regexes come compiled from validation.
    pub fn new(routes: &[RouteConfig]) -> Self {
        let matchers: Vec<&MatchConfig> = routes.iter().map(|r| &r.matcher).collect();
        Router {
            linear: matchers.iter().map(|m| Compiled::new(m)).collect(),
            index: Index::new(&matchers),
        }
    }

    /// Index of the first route matching the request.
    pub fn route<B>(&self, req: &Request<B>) -> Option<usize> {
        let indexed = SCRATCH.try_with(|s| {
            s.try_borrow_mut()
                .ok()
                .map(|mut s| self.index.route(&mut s, req))
        });
        match indexed {
            Ok(Some(found)) => found,
            _ => self.route_linear(req),
        }
    }

    /// The same answer as [`Router::route`], trying the routes one by one:
    /// the reference the index is tested and benchmarked against.
    #[doc(hidden)]
    pub fn route_linear<B>(&self, req: &Request<B>) -> Option<usize> {
        let path = req.uri().path();
        let host = request_host(req);
        self.linear
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

// === impl Compiled ===

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

// === impl Index ===

impl Index {
    fn new(matchers: &[&MatchConfig]) -> Self {
        let mut trie = TrieBuilder::default();
        let mut always = Vec::new();
        let mut patterns = Vec::new();
        let mut each = Vec::new();
        let mut hosts = HostsBuilder::default();
        let mut headers = HeadersBuilder::default();
        let mut route_headers = Vec::with_capacity(matchers.len());
        let mut routes = Vec::with_capacity(matchers.len());
        for (i, m) in matchers.iter().enumerate() {
            let id = i as u32;
            let mut regex = NONE;
            match &m.path {
                PathMatch::Any => always.push(id),
                PathMatch::Prefix(p) => trie.add(p.as_bytes(), id, false),
                PathMatch::Exact(p) => trie.add(p.as_bytes(), id, true),
                PathMatch::Regex(r) => {
                    regex = patterns.len() as u32;
                    patterns.push(format!("^(?:{})$", r.source));
                    each.push(r.anchored.clone());
                    match literal_prefixes(&r.source) {
                        Some(prefixes) => {
                            for p in prefixes {
                                trie.add(&p, id, false);
                            }
                        }
                        None => always.push(id),
                    }
                }
            }
            let methods = match &m.methods {
                None => Methods {
                    mask: None,
                    extension: Box::default(),
                },
                Some(list) => Methods {
                    mask: Some(list.iter().filter_map(method_bit).fold(0, |a, b| a | b)),
                    extension: list
                        .iter()
                        .filter(|x| method_bit(x).is_none())
                        .cloned()
                        .collect(),
                },
            };
            let host = m.host.as_deref().map_or(NONE, |h| hosts.add(h));
            route_headers.push(
                m.headers
                    .iter()
                    .map(|(k, v)| headers.add(k, v))
                    .collect::<Vec<_>>(),
            );
            routes.push(Entry {
                methods,
                host,
                regex,
                headers: (0, 0),
            });
        }
        let headers = headers.finish(&route_headers, &mut routes);
        let set = if patterns.is_empty() {
            None
        } else {
            build_set(&patterns)
        };
        Index {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            routes,
            always,
            trie: trie.finish(),
            regexes: Regexes { set, each },
            hosts: hosts.finish(),
            headers,
        }
    }

    fn route<B>(&self, s: &mut Scratch, req: &Request<B>) -> Option<usize> {
        let path = req.uri().path();
        let words = self.routes.len().div_ceil(64);
        s.prepare(words, self);
        self.trie.mark(path.as_bytes(), &mut s.candidates);
        for &i in &self.always {
            set_bit(&mut s.candidates, i);
        }
        let method = req.method();
        let bit = method_bit(method);
        let mut host_done = false;
        let mut regex_done = false;
        for w in 0..words {
            let mut bits = s.candidates[w];
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let Some(e) = self.routes.get(i) else {
                    continue;
                };
                if let Some(mask) = e.methods.mask {
                    let ok = match bit {
                        Some(b) => mask & b != 0,
                        None => e.methods.extension.contains(method),
                    };
                    if !ok {
                        continue;
                    }
                }
                if e.host != NONE {
                    if !host_done {
                        self.hosts.decide(request_host(req), &mut s.host_ok);
                        host_done = true;
                    }
                    if !bit_set(&s.host_ok, e.host) {
                        continue;
                    }
                }
                if !self.headers.route_ok(e, req.headers(), s) {
                    continue;
                }
                if e.regex != NONE {
                    match &self.regexes.set {
                        Some(set) => {
                            if !regex_done {
                                s.search(self.id, set, path);
                                regex_done = true;
                            }
                            let pid = PatternID::new_unchecked(e.regex as usize);
                            if !s.patterns.contains(pid) {
                                continue;
                            }
                        }
                        None => {
                            let matched = self
                                .regexes
                                .each
                                .get(e.regex as usize)
                                .is_some_and(|re| re.is_match(path));
                            if !matched {
                                continue;
                            }
                        }
                    }
                }
                return Some(i);
            }
        }
        None
    }
}

/// Every literal a match of `source` must start with, or `None` when there is
/// no such finite set (within limits that keep the trie small).
fn literal_prefixes(source: &str) -> Option<Vec<Vec<u8>>> {
    // The same syntax defaults the `regex` crate compiles with.
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(source)
        .ok()?;
    let seq = Extractor::new()
        .kind(ExtractKind::Prefix)
        .limit_literal_len(64)
        .limit_total(64)
        .extract(&hir);
    let literals = seq.literals()?;
    Some(literals.iter().map(|l| l.as_bytes().to_vec()).collect())
}

/// One regex of all the anchored patterns, reporting which match (what
/// `regex::RegexSet` builds, with the size limit scaled to the count).
fn build_set(patterns: &[String]) -> Option<meta::Regex> {
    // Validation holds each pattern to 1 MiB.
    let limit = patterns.len().saturating_mul(1 << 20).max(10 << 20);
    let config = meta::Config::new()
        .match_kind(MatchKind::All)
        .utf8_empty(true)
        .which_captures(regex_automata::nfa::thompson::WhichCaptures::None)
        .nfa_size_limit(Some(limit))
        .hybrid_cache_capacity(2 * (1 << 20));
    match meta::Builder::new()
        .configure(config)
        .syntax(regex_automata::util::syntax::Config::new().utf8(true))
        .build_many(patterns)
    {
        Ok(re) => Some(re),
        Err(e) => {
            tracing::warn!(error = %e, "path_regex routes are matched one by one: their combined regex did not build");
            None
        }
    }
}

fn set_bit(words: &mut [u64], i: u32) {
    if let Some(w) = words.get_mut(i as usize / 64) {
        *w |= 1 << (i % 64);
    }
}

fn bit_set(words: &[u64], i: u32) -> bool {
    words
        .get(i as usize / 64)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

// === impl Scratch ===

impl Scratch {
    /// Sizes and clears the state for one request on `index`.
    fn prepare(&mut self, words: usize, index: &Index) {
        fn reset(v: &mut Vec<u64>, words: usize) {
            if v.len() < words {
                v.resize(words, 0);
            }
            v[..words].fill(0);
        }
        reset(&mut self.candidates, words);
        reset(&mut self.host_ok, index.hosts.count.div_ceil(64));
        reset(&mut self.name_done, index.headers.names.len().div_ceil(64));
        reset(
            &mut self.pair_ok,
            index.headers.pair_name.len().div_ceil(64),
        );
    }

    /// Runs the combined regex on `path` into `self.patterns`.
    fn search(&mut self, router: u64, set: &meta::Regex, path: &str) {
        if self.patterns.capacity() < set.pattern_len() {
            self.patterns = PatternSet::new(set.pattern_len());
        } else {
            self.patterns.clear();
        }
        if !matches!(&self.cache, Some((id, _)) if *id == router) {
            // A new cache, not `Cache::reset`: that one panics when the new
            // regex uses an engine the old one did not (regex-automata 0.4).
            self.cache = Some((router, set.create_cache()));
        }
        if let Some((_, cache)) = &mut self.cache {
            set.which_overlapping_matches_with(cache, &Input::new(path), &mut self.patterns);
        }
    }
}

// === impl Trie ===

#[derive(Default)]
struct TrieBuilder {
    nodes: Vec<BuildNode>,
}

#[derive(Default)]
struct BuildNode {
    children: BTreeMap<u8, usize>,
    prefix: Vec<u32>,
    exact: Vec<u32>,
}

impl TrieBuilder {
    fn add(&mut self, key: &[u8], id: u32, exact: bool) {
        if self.nodes.is_empty() {
            self.nodes.push(BuildNode::default());
        }
        let mut at = 0;
        for &b in key {
            let next = self.nodes.len();
            at = *self.nodes[at].children.entry(b).or_insert(next);
            if at == next {
                self.nodes.push(BuildNode::default());
            }
        }
        let node = &mut self.nodes[at];
        let list = if exact {
            &mut node.exact
        } else {
            &mut node.prefix
        };
        // A regex with several literals sharing one is added once.
        if list.last() != Some(&id) {
            list.push(id);
        }
    }

    fn finish(self) -> Trie {
        let mut trie = Trie {
            nodes: Vec::with_capacity(self.nodes.len()),
            edges: Vec::new(),
            ids: Vec::new(),
        };
        for n in &self.nodes {
            let range = |v: &mut Vec<u32>, ids: &[u32]| {
                let start = v.len() as u32;
                v.extend_from_slice(ids);
                (start, v.len() as u32)
            };
            let edge_start = trie.edges.len() as u32;
            trie.edges
                .extend(n.children.iter().map(|(&b, &to)| (b, to as u32)));
            let prefix = range(&mut trie.ids, &n.prefix);
            let exact = range(&mut trie.ids, &n.exact);
            trie.nodes.push(Node {
                edges: (edge_start, trie.edges.len() as u32),
                prefix,
                exact,
            });
        }
        trie
    }
}

impl Trie {
    /// Sets the bit of every route whose prefix or exact path admits `path`.
    fn mark(&self, path: &[u8], out: &mut [u64]) {
        let mut at = 0usize;
        let mut depth = 0;
        while let Some(node) = self.nodes.get(at) {
            for &id in self.slice(node.prefix) {
                set_bit(out, id);
            }
            let Some(&b) = path.get(depth) else {
                for &id in self.slice(node.exact) {
                    set_bit(out, id);
                }
                return;
            };
            let edges = self
                .edges
                .get(node.edges.0 as usize..node.edges.1 as usize)
                .unwrap_or_default();
            match edges.binary_search_by_key(&b, |&(byte, _)| byte) {
                Ok(k) => at = edges[k].1 as usize,
                Err(_) => return,
            }
            depth += 1;
        }
    }

    fn slice(&self, (start, end): (u32, u32)) -> &[u32] {
        self.ids
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }
}

// === impl Hosts ===

#[derive(Default)]
struct HostsBuilder {
    ids: BTreeMap<String, u32>,
}

impl HostsBuilder {
    /// The id of host condition `h` (exact, or `*` + suffix).
    fn add(&mut self, h: &str) -> u32 {
        let key = h.to_ascii_lowercase();
        let next = self.ids.len() as u32;
        *self.ids.entry(key).or_insert(next)
    }

    fn finish(self) -> Hosts {
        let mut hosts = Hosts {
            count: self.ids.len(),
            exact: Vec::new(),
            suffix: Vec::new(),
            other: Vec::new(),
        };
        // BTreeMap order: each table comes out sorted.
        for (h, id) in self.ids {
            match h.strip_prefix('*') {
                Some(s) if s.starts_with('.') => hosts.suffix.push((s.as_bytes().into(), id)),
                Some(s) => hosts.other.push((s.as_bytes().into(), id)),
                None => hosts.exact.push((h.as_bytes().into(), id)),
            }
        }
        hosts
    }
}

impl Hosts {
    /// Sets the bit of every host condition `host` meets.
    fn decide(&self, host: Option<&str>, out: &mut [u64]) {
        let Some(h) = host else { return };
        let h = h.as_bytes();
        for (s, id) in &self.other {
            if h.len() > s.len() && h[h.len() - s.len()..].eq_ignore_ascii_case(s) {
                set_bit(out, *id);
            }
        }
        if h.len() > MAX_INDEXED_HOST {
            for (e, id) in &self.exact {
                if h.eq_ignore_ascii_case(e) {
                    set_bit(out, *id);
                }
            }
            for (s, id) in &self.suffix {
                if h.len() > s.len() && h[h.len() - s.len()..].eq_ignore_ascii_case(s) {
                    set_bit(out, *id);
                }
            }
            return;
        }
        let mut buf = [0u8; MAX_INDEXED_HOST];
        let lower = &mut buf[..h.len()];
        lower.copy_from_slice(h);
        lower.make_ascii_lowercase();
        let lower = &*lower;
        let find = |table: &[(Box<[u8]>, u32)], key: &[u8]| {
            table
                .binary_search_by(|(k, _)| (**k).cmp(key))
                .ok()
                .map(|j| table[j].1)
        };
        if let Some(id) = find(&self.exact, lower) {
            set_bit(out, id);
        }
        if !self.suffix.is_empty() {
            // `*.b.c` matches `a.b.c`: every suffix from a dot past the first byte.
            for (at, _) in lower.iter().enumerate().skip(1).filter(|(_, &c)| c == b'.') {
                if let Some(id) = find(&self.suffix, &lower[at..]) {
                    set_bit(out, id);
                }
            }
        }
    }
}

// === impl Headers ===

#[derive(Default)]
struct HeadersBuilder {
    pairs: BTreeSet<(String, Vec<u8>)>,
}

impl HeadersBuilder {
    /// Records a required pair; its key until [`HeadersBuilder::finish`] assigns ids.
    fn add(&mut self, name: &HeaderName, value: &HeaderValue) -> (String, Vec<u8>) {
        let key = (name.as_str().to_string(), value.as_bytes().to_vec());
        self.pairs.insert(key.clone());
        key
    }

    /// Assigns pair ids (grouped by name, BTreeSet order) and each route's range.
    fn finish(self, route_headers: &[Vec<(String, Vec<u8>)>], routes: &mut [Entry]) -> Headers {
        let mut out = Headers {
            names: Vec::new(),
            values: Vec::new(),
            pair_name: Vec::new(),
            route_pairs: Vec::new(),
        };
        let mut ids = BTreeMap::new();
        for (name, value) in self.pairs {
            // Both came from a valid HeaderName / HeaderValue.
            let (Ok(header), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(&value),
            ) else {
                continue;
            };
            if out.names.last() != Some(&header) {
                out.names.push(header);
                out.values.push(Vec::new());
            }
            let pair = out.pair_name.len() as u32;
            out.pair_name.push(out.names.len() as u32 - 1);
            if let Some(vs) = out.values.last_mut() {
                vs.push((v, pair));
            }
            ids.insert((name, value), pair);
        }
        for (entry, pairs) in routes.iter_mut().zip(route_headers) {
            let start = out.route_pairs.len() as u32;
            for p in pairs {
                // A pair that could not be rebuilt can never be met.
                out.route_pairs.push(ids.get(p).copied().unwrap_or(NONE));
            }
            entry.headers = (start, out.route_pairs.len() as u32);
        }
        out
    }
}

impl Headers {
    /// Whether the request carries every header pair route `e` requires,
    /// looking each name up at most once per request.
    fn route_ok(&self, e: &Entry, headers: &HeaderMap, s: &mut Scratch) -> bool {
        let pairs = self
            .route_pairs
            .get(e.headers.0 as usize..e.headers.1 as usize)
            .unwrap_or_default();
        for &pair in pairs {
            let Some(&name) = self.pair_name.get(pair as usize) else {
                return false;
            };
            if !bit_set(&s.name_done, name) {
                set_bit(&mut s.name_done, name);
                self.decide(name, headers, &mut s.pair_ok);
            }
            if !bit_set(&s.pair_ok, pair) {
                return false;
            }
        }
        true
    }

    /// Sets the bit of every pair of header `name` the request meets.
    fn decide(&self, name: u32, headers: &HeaderMap, out: &mut [u64]) {
        let (Some(header), Some(values)) = (
            self.names.get(name as usize),
            self.values.get(name as usize),
        ) else {
            return;
        };
        for have in headers.get_all(header) {
            if let Ok(j) = values.binary_search_by(|(v, _)| v.as_bytes().cmp(have.as_bytes())) {
                set_bit(out, values[j].1);
            }
        }
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
    fn regex_literal_prefixes() {
        let p = |s: &str| {
            literal_prefixes(s).map(|v| {
                v.into_iter()
                    .map(|b| String::from_utf8(b).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        // Small classes are expanded.
        let digits: Vec<String> = (0..10).map(|d| format!("/orders/{d}")).collect();
        assert_eq!(p("/orders/[0-9]+/items").unwrap(), digits);
        assert_eq!(p("/a|/b/.*").unwrap(), ["/a", "/b/"]);
        assert_eq!(p(".*\\.png"), None);
    }

    /// Route tables and requests drawn from small pools, so prefixes
    /// overlap, regexes with and without literal prefixes both match, and
    /// every host, header and method condition is met by some requests.
    const PREFIXES: &[&str] = &[
        "/", "/a", "/a/", "/ab", "/a/1", "/b", "/b/", "/api/", "/orders/", "/x",
    ];
    const REGEXES: &[&str] = &[
        "/a/[0-9]+",
        "/a/[0-9]+(/.*)?",
        "/api/v[12]/items/[0-9]+(/.*)?",
        ".*",
        ".*/b",
        "[a-z/]+",
        "/a|/b/.*",
        "(/a|/ab)c?",
        "(?i-u:/API/).*",
        "",
        "/a*",
        "(?:)|/a",
        "\\A/x\\z",
        "/é.*",
        "[^/]*",
        "/(a|b)/[0-9]{2,3}",
        "/orders/[0-9]+/items",
        "/orders/[0-9]+/items/3",
        "/\\w+/\\d+",
        "/a/?",
        "(?:/a)+",
        "\\*",
        "(?s).+",
        "/a\\b.*",
        "/[a-c]{1,3}",
        "/(?:x|y|z)(?:1|2|3)/.*",
    ];
    const PATHS: &[&str] = &[
        "/",
        "/a",
        "/a/",
        "/ab",
        "/abc",
        "/a/1",
        "/a/12",
        "/a/123/x",
        "/b",
        "/b/",
        "/b/c",
        "/API/x",
        "/api/x",
        "/api/v1/items/5",
        "/api/v2/items/5/z",
        "/orders/12345/items",
        "/orders/1/items/3",
        "/%C3%A9",
        "/x",
        "/aa",
        "/a/b",
        "/x1/q",
        "/c",
        "/a-b",
        "/a/b/12",
    ];
    const HOSTS: &[&str] = &[
        "a.com",
        "*.example.com",
        "*.com",
        "x.example.com",
        "B.com",
        "*.x.example.com",
        "::1",
    ];
    const REQUEST_HOSTS: &[&str] = &[
        "a.com",
        "A.COM:80",
        "x.example.com",
        "example.com",
        "y.x.Example.COM",
        "[::1]:80",
        ".example.com",
        "b.com",
        "B.COM",
        "a.com.",
        "com",
    ];
    const METHODS: &[&str] = &["GET", "POST", "HEAD", "PURGE", "DELETE"];

    fn pick_from<'a>(rng: &mut fastrand::Rng, pool: &[&'a str]) -> &'a str {
        pool[rng.usize(..pool.len())]
    }

    fn random_table(rng: &mut fastrand::Rng) -> String {
        let mut y = String::from(
            "version: 1\nlisteners: [{name: l, bind: \"127.0.0.1:0\"}]\nupstreams: {app: {endpoints: [\"127.0.0.1:1\"]}}\nroutes:\n",
        );
        // Up to 150 routes: several words of the candidate bitset.
        let n = if rng.u8(..8) == 0 {
            rng.usize(64..150)
        } else {
            rng.usize(1..40)
        };
        for i in 0..n {
            let mut m = Vec::new();
            match rng.u8(..10) {
                0 => {}
                1..=3 => m.push(format!("path_prefix: '{}'", pick_from(rng, PREFIXES))),
                4..=5 => m.push(format!("path_exact: '{}'", pick_from(rng, PATHS))),
                _ => m.push(format!("path_regex: '{}'", pick_from(rng, REGEXES))),
            }
            if rng.u8(..4) == 0 {
                let k = rng.usize(0..3);
                let ms: Vec<&str> = (0..k).map(|_| pick_from(rng, METHODS)).collect();
                m.push(format!("methods: [{}]", ms.join(", ")));
            }
            if rng.u8(..4) == 0 {
                m.push(format!("host: '{}'", pick_from(rng, HOSTS)));
            }
            if rng.u8(..3) == 0 {
                // distinct keys; `X-A` and `x-a` are the same header, both required
                let mut names = ["x-a", "x-b", "X-A"];
                rng.shuffle(&mut names);
                let hs: Vec<String> = names[..rng.usize(1..3)]
                    .iter()
                    .map(|k| format!("{k}: '{}'", pick_from(rng, &["1", "2", "v"])))
                    .collect();
                m.push(format!("headers: {{{}}}", hs.join(", ")));
            }
            y.push_str(&format!(
                "  - {{name: r{i}, match: {{{}}}, upstream: app}}\n",
                m.join(", ")
            ));
        }
        y
    }

    fn random_request(rng: &mut fastrand::Rng) -> Request<()> {
        let host = pick_from(rng, REQUEST_HOSTS);
        let long = format!("{}.example.com", "a".repeat(300));
        let uri = match rng.u8(..10) {
            // authority-form: the path is empty
            0 => "a.com:443".to_string(),
            1 => "*".to_string(),
            2 => format!("http://{host}{}", pick_from(rng, PATHS)),
            3 => format!("{}?q=1", pick_from(rng, PATHS)),
            _ => pick_from(rng, PATHS).to_string(),
        };
        let method = pick_from(rng, &["GET", "POST", "HEAD", "PURGE", "PUT", "get"]);
        let mut b = Request::builder().method(method).uri(uri);
        match rng.u8(..8) {
            0 => {}
            1 => b = b.header("host", long),
            _ => b = b.header("host", host),
        }
        for _ in 0..rng.usize(0..4) {
            b = b.header(
                pick_from(rng, &["x-a", "x-b"]),
                pick_from(rng, &["1", "2", "v", "V"]),
            );
        }
        b.body(()).unwrap()
    }

    #[test]
    fn index_agrees_with_linear_scan() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let (mut checked, mut matched) = (0, 0);
        let mut previous: Option<Router> = None;
        for _ in 0..200 {
            let y = random_table(&mut rng);
            let loaded = load_str(&y, "t.yaml").unwrap_or_else(|e| panic!("{e}\n{y}"));
            let router = Router::new(&loaded.config.routes);
            for _ in 0..150 {
                let req = random_request(&mut rng);
                let want = router.route_linear(&req);
                assert_eq!(
                    router.route(&req),
                    want,
                    "{} {}\n{req:?}\n{y}",
                    req.method(),
                    req.uri()
                );
                // Alternating routers on one thread switch the regex search cache.
                if let Some(p) = previous.as_ref().filter(|_| checked % 16 == 0) {
                    assert_eq!(p.route(&req), p.route_linear(&req));
                }
                checked += 1;
                matched += usize::from(want.is_some());
            }
            previous = Some(router);
        }
        // Both outcomes are well represented.
        assert!(
            matched > checked / 10 && checked - matched > checked / 10,
            "{matched} of {checked}"
        );
    }

    #[test]
    fn ports_and_v6() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
