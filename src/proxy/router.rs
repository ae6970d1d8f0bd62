//! First-match route table, compiled once per config.
//!
//! A request gets the first route, in config order, whose every condition
//! holds: path (`path_prefix`, `path_exact`, or `path_regex` anchored to the
//! whole path, as Envoy's `safe_regex` is), methods, host (exact or
//! `*.suffix`, case-insensitive, port stripped) and exact header matches
//! (any value of a repeated header may match).
//!
//! The routes are not tried one by one. Matching works on bitsets of route
//! ids:
//!
//! - a path-compressed byte trie of every path prefix, exact path and regex
//!   literal prefix (what every match of the regex must start with) marks
//!   the routes the path can match, plus those any path can (no path
//!   condition, or a regex without a literal prefix such as `.*\.png`);
//! - the method keeps the routes that allow it (one AND per bitset word);
//! - then, while the first route still standing has a condition not yet
//!   decided, that kind of condition is decided for all routes at once: the
//!   host (looked up, lowercased, in a sorted table of exact hosts and one of
//!   `*.suffix`es), one header name (looked up once, its values searched in
//!   the sorted values routes require), or the path regexes: all of them form
//!   one regex whose leftmost-first search gives the first route whose regex
//!   matches, clearing every regex route before it.
//!
//! Each kind of condition is decided at most once per request, so the first
//! route left is the one a linear scan finds (the linear scan is kept as the
//! reference, [`Router::route_linear`]). The per-request state lives in a
//! thread-local scratch sized by the largest table the thread has used: a
//! request allocates nothing. With 200 routes and the request matching the
//! last, routing costs about 460 instructions more than with one route
//! (docs/benchmarks.md, "Many routes").

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use regex::Regex;
use regex_automata::{meta, Anchored, Input, MatchKind};
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

/// Ids of combined regexes, so a thread's search cache is used only with
/// the regex it was made for.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The last combined regex built, by its patterns: a reload that leaves the
/// `path_regex`es as they were reuses it (and threads keep their caches)
/// instead of compiling it again.
type BuiltSet = (Vec<String>, u64, meta::Regex);
static LAST_SET: parking_lot::Mutex<Option<BuiltSet>> = parking_lot::const_mutex(None);

/// The indexed form of the table. Conditions are decided for all routes at
/// once on bitsets of route ids, each kind at most once per request and only
/// when the first route still standing needs it.
struct Index {
    /// Id of `regexes.set`, which a thread-local search cache belongs to.
    id: u64,
    /// Words of a bitset over the routes.
    words: usize,
    /// One per route, config order.
    routes: Vec<Entry>,
    trie: Trie,
    /// Routes whose path condition holds for any path: none given, or a
    /// regex whose matches need not start with any particular literal.
    always: IdSet,
    /// `None` when no route has `methods:`.
    methods: Option<MethodIndex>,
    hosts: Hosts,
    headers: Headers,
    regexes: Regexes,
}

/// What a route needs beyond its path prefix, as ids into the shared tables.
struct Entry {
    /// Host condition id, or [`NONE`].
    host: u32,
    /// Range of [`Headers::route_names`]: the distinct header names it matches on.
    names: (u32, u32),
    /// Pattern id in [`Regexes`], or [`NONE`] (the trie decided the path).
    regex: u32,
}

/// A set of route ids: a sorted list, or a bitset when that is no larger.
enum IdSet {
    List(Box<[u32]>),
    Dense(Box<[u64]>),
}

/// The routes each method may take.
struct MethodIndex {
    /// Per standard method (by [`STANDARD_METHODS`] position): routes that allow it.
    standard: Vec<Box<[u64]>>,
    /// Routes without `methods:`.
    any: IdSet,
    /// Routes listing methods outside the standard ones, with those methods.
    extension: Vec<(u32, Box<[Method]>)>,
}

/// The standard methods; the rest are extension methods.
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

/// Path-compressed byte trie of path prefixes, exact paths and regex
/// literal prefixes, flattened. Node 0 is the root (the empty prefix).
struct Trie {
    nodes: Vec<Node>,
    /// Edge labels of all nodes.
    labels: Vec<u8>,
    /// Child edges of all nodes, each node's sorted by first byte.
    edges: Vec<(u8, u32)>,
}

struct Node {
    /// The bytes from the parent to this node (range of [`Trie::labels`]).
    label: (u32, u32),
    /// Range of [`Trie::edges`].
    edges: (u32, u32),
    /// Routes for every path that starts with this node's bytes.
    prefix: IdSet,
    /// Routes only for the path equal to this node's bytes.
    exact: IdSet,
}

/// The `path_regex`es, one pattern per route that has one, in route order.
struct Regexes {
    /// Every pattern at once, leftmost-first: one search gives the first
    /// pattern (so the first route) whose regex matches the path. `None` if
    /// there are none or it failed to build (then each route's own regex runs).
    set: Option<meta::Regex>,
    each: Vec<Regex>,
    /// Per pattern: its route.
    route_of: Vec<u32>,
    /// Routes with a regex (a bitset, empty when there are none).
    routes: Box<[u64]>,
}

/// What the combined regex said about this request's path.
#[derive(Clone, Copy)]
enum RegexState {
    NotRun,
    /// No pattern matches.
    None,
    /// The first pattern that matches; later ones are unknown.
    First(u32),
}

/// Distinct host conditions, lowercased, each with its id.
struct Hosts {
    /// Routes with a host condition.
    routes: IdSet,
    /// Per condition id: the routes using it.
    by_condition: Vec<IdSet>,
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
    /// Per name: its required values, sorted by [`ValueKey`], with their pair id.
    values: Vec<Vec<(ValueKey, u32)>>,
    /// The bytes of every required value, which [`ValueKey`]s point into.
    value_bytes: Vec<u8>,
    /// Per name: the routes matching on it.
    name_routes: Vec<IdSet>,
    /// Per name: routes requiring two or more of its values, with those pairs.
    several: Vec<Vec<(u32, Box<[u32]>)>>,
    /// Per pair: the routes requiring it.
    pair_routes: Vec<IdSet>,
    /// Per route (ranges in [`Entry::names`]): the distinct names it matches on.
    route_names: Vec<u32>,
}

/// A header value as searched: ordered by its first 8 bytes and length as
/// integers, so a search compares bytes in memory only between values that
/// share both (and the values sit in one buffer, not an allocation each).
#[derive(Clone, Copy)]
struct ValueKey {
    head: u64,
    len: u32,
    /// Offset in [`Headers::value_bytes`].
    at: u32,
}

/// The first 8 bytes of `v`, big-endian (so integer order is byte order), zero-padded.
fn value_head(v: &[u8]) -> u64 {
    let mut head = [0u8; 8];
    let n = v.len().min(8);
    head[..n].copy_from_slice(&v[..n]);
    u64::from_be_bytes(head)
}

/// Per-thread matching state, reused by every request.
struct Scratch {
    /// Routes still in the running.
    alive: Vec<u64>,
    /// Routes meeting the condition being decided.
    ok: Vec<u64>,
    name_done: Vec<u64>,
    pair_ok: Vec<u64>,
    /// The search cache of the router with this id.
    cache: Option<(u64, meta::Cache)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            alive: Vec::new(),
            ok: Vec::new(),
            name_done: Vec::new(),
            pair_ok: Vec::new(),
            cache: None,
        })
    };
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
        let words = matchers.len().div_ceil(64);
        let mut trie = TrieBuilder::default();
        let mut always = Vec::new();
        let mut patterns = Vec::new();
        let mut each = Vec::new();
        let mut regex_routes = vec![0; words];
        let mut route_of = Vec::new();
        let mut methods = MethodsBuilder::default();
        let mut hosts = HostsBuilder::default();
        let mut headers = HeadersBuilder::default();
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
                    route_of.push(id);
                    set_bit(&mut regex_routes, id);
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
            methods.add(id, m.methods.as_deref());
            let host = m.host.as_deref().map_or(NONE, |h| hosts.add(h, id));
            headers.add(id, &m.headers);
            routes.push(Entry {
                host,
                names: (0, 0),
                regex,
            });
        }
        let headers = headers.finish(words, &mut routes);
        let (id, set) = match patterns.is_empty() {
            true => (NONE.into(), None),
            false => build_set(patterns).map_or((NONE.into(), None), |(id, re)| (id, Some(re))),
        };
        Index {
            id,
            words,
            routes,
            trie: trie.finish(words),
            always: IdSet::new(&always, words),
            methods: methods.finish(words),
            hosts: hosts.finish(words),
            headers,
            regexes: Regexes {
                set,
                each,
                route_of,
                routes: regex_routes.into(),
            },
        }
    }

    /// The first route whose conditions all hold: the first candidate left
    /// once every condition it has was decided (for all routes at once).
    fn route<B>(&self, s: &mut Scratch, req: &Request<B>) -> Option<usize> {
        let path = req.uri().path();
        s.prepare(self);
        self.trie.mark(path.as_bytes(), &mut s.alive);
        self.always.or_into(&mut s.alive);
        if let Some(m) = &self.methods {
            m.filter(req.method(), s);
        }
        let mut host_done = false;
        let mut regex = RegexState::NotRun;
        let mut from = 0;
        loop {
            let i = first_set(&s.alive, &mut from)?;
            let e = self.routes.get(i)?;
            if e.host != NONE && !host_done {
                host_done = true;
                self.hosts.filter(request_host(req), s);
                continue;
            }
            let names = self
                .headers
                .route_names
                .get(e.names.0 as usize..e.names.1 as usize)
                .unwrap_or_default();
            if let Some(&n) = names.iter().find(|&&n| !bit_set(&s.name_done, n)) {
                set_bit(&mut s.name_done, n);
                self.headers.filter(n, req.headers(), s);
                continue;
            }
            if e.regex != NONE {
                if let (RegexState::NotRun, Some(set)) = (regex, &self.regexes.set) {
                    regex = s.search(self.id, set, path);
                    self.drop_regexes_before(regex, &mut s.alive);
                    continue;
                }
                let matched = match regex {
                    RegexState::First(p) if p == e.regex => true,
                    RegexState::First(p) if p > e.regex => false,
                    RegexState::None => false,
                    // Past the first match (that route fell to another
                    // condition), or no combined regex: this route's own.
                    _ => self
                        .regexes
                        .each
                        .get(e.regex as usize)
                        .is_some_and(|re| re.is_match(path)),
                };
                if !matched {
                    clear_bit(&mut s.alive, i as u32);
                    continue;
                }
            }
            return Some(i);
        }
    }

    /// After the combined regex ran: clears the regex routes before the
    /// first whose pattern matched (all of them when none did).
    fn drop_regexes_before(&self, state: RegexState, alive: &mut [u64]) {
        let end = match state {
            RegexState::NotRun => return,
            RegexState::None => usize::MAX,
            RegexState::First(p) => self
                .regexes
                .route_of
                .get(p as usize)
                .map_or(usize::MAX, |&r| r as usize),
        };
        for (w, (a, r)) in alive.iter_mut().zip(self.regexes.routes.iter()).enumerate() {
            let below = match end.saturating_sub(w * 64) {
                0 => break,
                n if n >= 64 => !0,
                n => (1u64 << n) - 1,
            };
            *a &= !(r & below);
        }
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

/// One regex of all the anchored patterns, earlier patterns preferred: the
/// pattern a search reports is the first that matches the whole path (each
/// is `^(?:...)$`, so every match spans it).
fn build_set(patterns: Vec<String>) -> Option<(u64, meta::Regex)> {
    if let Some((last, id, re)) = LAST_SET.lock().as_ref() {
        if *last == patterns {
            return Some((*id, re.clone()));
        }
    }
    // Validation holds each pattern to 1 MiB.
    let limit = patterns.len().saturating_mul(1 << 20).max(10 << 20);
    let config = meta::Config::new()
        .match_kind(MatchKind::LeftmostFirst)
        .utf8_empty(true)
        .which_captures(regex_automata::nfa::thompson::WhichCaptures::Implicit)
        .nfa_size_limit(Some(limit))
        .hybrid_cache_capacity(2 * (1 << 20));
    let built = meta::Builder::new()
        .configure(config)
        .syntax(regex_automata::util::syntax::Config::new().utf8(true))
        .build_many(&patterns);
    match built {
        Ok(re) => {
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            *LAST_SET.lock() = Some((patterns, id, re.clone()));
            Some((id, re))
        }
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

fn clear_bit(words: &mut [u64], i: u32) {
    if let Some(w) = words.get_mut(i as usize / 64) {
        *w &= !(1 << (i % 64));
    }
}

fn bit_set(words: &[u64], i: u32) -> bool {
    words
        .get(i as usize / 64)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// The lowest set bit at or after word `*from`, leaving `*from` at its word.
fn first_set(words: &[u64], from: &mut usize) -> Option<usize> {
    while let Some(&w) = words.get(*from) {
        if w != 0 {
            return Some(*from * 64 + w.trailing_zeros() as usize);
        }
        *from += 1;
    }
    None
}

/// `v`, cleared: the bitset a condition being decided fills.
fn cleared(v: &mut [u64]) -> &mut [u64] {
    v.fill(0);
    v
}

fn and_into(out: &mut [u64], with: &[u64]) {
    for (o, w) in out.iter_mut().zip(with) {
        *o &= w;
    }
}

// === impl IdSet ===

impl IdSet {
    /// From sorted ids, in whichever form is smaller.
    fn new(ids: &[u32], words: usize) -> Self {
        // 8 bytes a word against 4 an id.
        if !ids.is_empty() && words * 2 <= ids.len() {
            let mut bits = vec![0; words];
            for &id in ids {
                set_bit(&mut bits, id);
            }
            IdSet::Dense(bits.into())
        } else {
            IdSet::List(ids.into())
        }
    }

    fn or_into(&self, out: &mut [u64]) {
        match self {
            IdSet::List(ids) => {
                for &id in ids.iter() {
                    set_bit(out, id);
                }
            }
            IdSet::Dense(bits) => {
                for (o, w) in out.iter_mut().zip(bits.iter()) {
                    *o |= w;
                }
            }
        }
    }

    /// Drops from `alive` the members of this set that `ok` lacks.
    fn keep_only(&self, alive: &mut [u64], ok: &[u64]) {
        match self {
            IdSet::List(ids) => {
                for &id in ids.iter() {
                    if !bit_set(ok, id) {
                        clear_bit(alive, id);
                    }
                }
            }
            IdSet::Dense(bits) => {
                for ((a, w), k) in alive.iter_mut().zip(bits.iter()).zip(ok) {
                    *a &= !w | k;
                }
            }
        }
    }
}

// === impl Scratch ===

impl Scratch {
    /// Sizes and clears the state for one request on `index`.
    fn prepare(&mut self, index: &Index) {
        // `clear` keeps the allocation: no request after the first on a
        // thread allocates unless the table grew.
        fn reset(v: &mut Vec<u64>, words: usize) {
            v.clear();
            v.resize(words, 0);
        }
        reset(&mut self.alive, index.words);
        reset(&mut self.ok, index.words);
        reset(&mut self.name_done, index.headers.names.len().div_ceil(64));
        reset(
            &mut self.pair_ok,
            index.headers.pair_routes.len().div_ceil(64),
        );
    }

    /// Runs the combined regex on `path`.
    fn search(&mut self, router: u64, set: &meta::Regex, path: &str) -> RegexState {
        if !matches!(&self.cache, Some((id, _)) if *id == router) {
            // A new cache, not `Cache::reset`: that one panics when the new
            // regex uses an engine the old one did not (regex-automata 0.4).
            self.cache = Some((router, set.create_cache()));
        }
        let Some((_, cache)) = &mut self.cache else {
            return RegexState::NotRun;
        };
        let input = Input::new(path).anchored(Anchored::Yes);
        match set.search_half_with(cache, &input) {
            Some(m) => RegexState::First(m.pattern().as_u32()),
            None => RegexState::None,
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
    /// Adds route `id` under `key`; ids arrive in increasing order.
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

    /// Flattens the trie, merging chains of nodes that hold no route and
    /// have one child into one labelled edge.
    fn finish(mut self, words: usize) -> Trie {
        if self.nodes.is_empty() {
            self.nodes.push(BuildNode::default());
        }
        let empty = |n: &BuildNode| n.prefix.is_empty() && n.exact.is_empty();
        let mut trie = Trie {
            nodes: vec![Node {
                label: (0, 0),
                edges: (0, 0),
                prefix: IdSet::new(&self.nodes[0].prefix, words),
                exact: IdSet::new(&self.nodes[0].exact, words),
            }],
            labels: Vec::new(),
            edges: Vec::new(),
        };
        let mut stack = vec![(0usize, 0usize)];
        while let Some((from, out)) = stack.pop() {
            let start = trie.edges.len() as u32;
            for (&byte, &child) in &self.nodes[from].children {
                let label_start = trie.labels.len() as u32;
                trie.labels.push(byte);
                let mut at = child;
                while empty(&self.nodes[at]) && self.nodes[at].children.len() == 1 {
                    let Some((&b, &next)) = self.nodes[at].children.iter().next() else {
                        break;
                    };
                    trie.labels.push(b);
                    at = next;
                }
                let n = &self.nodes[at];
                let id = trie.nodes.len();
                trie.nodes.push(Node {
                    label: (label_start, trie.labels.len() as u32),
                    edges: (0, 0),
                    prefix: IdSet::new(&n.prefix, words),
                    exact: IdSet::new(&n.exact, words),
                });
                trie.edges.push((byte, id as u32));
                stack.push((at, id));
            }
            trie.nodes[out].edges = (start, trie.edges.len() as u32);
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
            node.prefix.or_into(out);
            let Some(&b) = path.get(depth) else {
                node.exact.or_into(out);
                return;
            };
            let edges = self
                .edges
                .get(node.edges.0 as usize..node.edges.1 as usize)
                .unwrap_or_default();
            let Ok(k) = edges.binary_search_by_key(&b, |&(byte, _)| byte) else {
                return;
            };
            at = edges[k].1 as usize;
            let Some(child) = self.nodes.get(at) else {
                return;
            };
            let label = self
                .labels
                .get(child.label.0 as usize..child.label.1 as usize)
                .unwrap_or_default();
            if !path
                .get(depth..)
                .is_some_and(|rest| rest.starts_with(label))
            {
                return;
            }
            depth += label.len();
        }
    }
}

// === impl MethodIndex ===

#[derive(Default)]
struct MethodsBuilder {
    any: Vec<u32>,
    lists: Vec<(u32, Vec<Method>)>,
}

impl MethodsBuilder {
    fn add(&mut self, id: u32, methods: Option<&[Method]>) {
        match methods {
            None => self.any.push(id),
            Some(list) => self.lists.push((id, list.to_vec())),
        }
    }

    fn finish(self, words: usize) -> Option<MethodIndex> {
        if self.lists.is_empty() {
            return None;
        }
        let standard = STANDARD_METHODS
            .iter()
            .map(|m| {
                let mut bits = vec![0; words];
                for &id in &self.any {
                    set_bit(&mut bits, id);
                }
                for (id, list) in &self.lists {
                    if list.contains(m) {
                        set_bit(&mut bits, *id);
                    }
                }
                bits.into_boxed_slice()
            })
            .collect();
        let extension = self
            .lists
            .into_iter()
            .filter_map(|(id, list)| {
                let ext: Box<[Method]> = list
                    .into_iter()
                    .filter(|m| !STANDARD_METHODS.contains(m))
                    .collect();
                (!ext.is_empty()).then_some((id, ext))
            })
            .collect();
        Some(MethodIndex {
            standard,
            any: IdSet::new(&self.any, words),
            extension,
        })
    }
}

impl MethodIndex {
    /// Drops the routes whose `methods:` exclude `method`.
    fn filter(&self, method: &Method, s: &mut Scratch) {
        let standard = STANDARD_METHODS
            .iter()
            .position(|m| m == method)
            .and_then(|k| self.standard.get(k));
        if let Some(allowed) = standard {
            and_into(&mut s.alive, allowed);
            return;
        }
        let ok = cleared(&mut s.ok);
        self.any.or_into(ok);
        for (id, list) in &self.extension {
            if list.contains(method) {
                set_bit(ok, *id);
            }
        }
        and_into(&mut s.alive, &s.ok);
    }
}

// === impl Hosts ===

#[derive(Default)]
struct HostsBuilder {
    ids: BTreeMap<String, u32>,
    by_condition: Vec<Vec<u32>>,
    routes: Vec<u32>,
}

impl HostsBuilder {
    /// The id of host condition `h` (exact, or `*` + suffix) of route `route`.
    fn add(&mut self, h: &str, route: u32) -> u32 {
        let next = self.ids.len() as u32;
        let id = *self.ids.entry(h.to_ascii_lowercase()).or_insert(next);
        if id == next {
            self.by_condition.push(Vec::new());
        }
        if let Some(list) = self.by_condition.get_mut(id as usize) {
            list.push(route);
        }
        self.routes.push(route);
        id
    }

    fn finish(self, words: usize) -> Hosts {
        let mut hosts = Hosts {
            routes: IdSet::new(&self.routes, words),
            by_condition: self
                .by_condition
                .iter()
                .map(|ids| IdSet::new(ids, words))
                .collect(),
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
    /// Drops the routes whose host condition `host` does not meet.
    fn filter(&self, host: Option<&str>, s: &mut Scratch) {
        let ok = cleared(&mut s.ok);
        self.decide(host, |id| {
            if let Some(routes) = self.by_condition.get(id as usize) {
                routes.or_into(ok);
            }
        });
        self.routes.keep_only(&mut s.alive, &s.ok);
    }

    /// Calls `met` with every host condition `host` meets.
    fn decide(&self, host: Option<&str>, mut met: impl FnMut(u32)) {
        let Some(h) = host else { return };
        let h = h.as_bytes();
        let tail_is =
            |s: &[u8]| h.len() > s.len() && h[h.len() - s.len()..].eq_ignore_ascii_case(s);
        for (s, id) in &self.other {
            if tail_is(s) {
                met(*id);
            }
        }
        if h.len() > MAX_INDEXED_HOST {
            for (e, id) in &self.exact {
                if h.eq_ignore_ascii_case(e) {
                    met(*id);
                }
            }
            for (s, id) in &self.suffix {
                if tail_is(s) {
                    met(*id);
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
            met(id);
        }
        if !self.suffix.is_empty() {
            // `*.b.c` matches `a.b.c`: every suffix from a dot past the first byte.
            for (at, _) in lower.iter().enumerate().skip(1).filter(|(_, &c)| c == b'.') {
                if let Some(id) = find(&self.suffix, &lower[at..]) {
                    met(id);
                }
            }
        }
    }
}

// === impl Headers ===

type PairKey = (String, Vec<u8>);

#[derive(Default)]
struct HeadersBuilder {
    pairs: BTreeSet<PairKey>,
    routes: Vec<(u32, Vec<PairKey>)>,
}

impl HeadersBuilder {
    fn add(&mut self, route: u32, headers: &[(HeaderName, HeaderValue)]) {
        if headers.is_empty() {
            return;
        }
        let keys: Vec<PairKey> = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        self.pairs.extend(keys.iter().cloned());
        self.routes.push((route, keys));
    }

    /// Assigns pair ids (grouped by name, BTreeSet order) and each route's names.
    fn finish(self, words: usize, routes: &mut [Entry]) -> Headers {
        let mut names = Vec::new();
        let mut values: Vec<Vec<(ValueKey, u32)>> = Vec::new();
        let mut value_bytes = Vec::new();
        let mut pair_name = Vec::new();
        let mut ids = BTreeMap::new();
        for (name, value) in self.pairs {
            // The name came from a valid HeaderName.
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                continue;
            };
            if names.last() != Some(&header) {
                names.push(header);
                values.push(Vec::new());
            }
            let pair = pair_name.len() as u32;
            pair_name.push(names.len() as u32 - 1);
            let key = ValueKey {
                head: value_head(&value),
                len: value.len() as u32,
                at: value_bytes.len() as u32,
            };
            value_bytes.extend_from_slice(&value);
            if let Some(vs) = values.last_mut() {
                vs.push((key, pair));
            }
            ids.insert((name, value), pair);
        }
        let mut name_lists = vec![Vec::new(); names.len()];
        let mut pair_lists = vec![Vec::new(); pair_name.len()];
        let mut several = vec![Vec::new(); names.len()];
        let mut route_names = Vec::new();
        for (route, keys) in self.routes {
            // Pair ids sort by name: each name's pairs are adjacent.
            let mut pairs: Vec<u32> = keys.iter().filter_map(|k| ids.get(k).copied()).collect();
            pairs.sort_unstable();
            pairs.dedup();
            let start = route_names.len() as u32;
            for group in pairs.chunk_by(|a, b| pair_name[*a as usize] == pair_name[*b as usize]) {
                let name = pair_name[group[0] as usize];
                route_names.push(name);
                name_lists[name as usize].push(route);
                for &p in group {
                    pair_lists[p as usize].push(route);
                }
                if group.len() > 1 {
                    several[name as usize].push((route, group.into()));
                }
            }
            if let Some(e) = routes.get_mut(route as usize) {
                e.names = (start, route_names.len() as u32);
            }
        }
        let headers = Headers {
            names,
            values,
            value_bytes,
            name_routes: name_lists.iter().map(|l| IdSet::new(l, words)).collect(),
            several,
            pair_routes: pair_lists.iter().map(|l| IdSet::new(l, words)).collect(),
            route_names,
        };
        headers.sort_values()
    }
}

impl Headers {
    /// Sorts each name's values for [`Headers::find`].
    fn sort_values(mut self) -> Self {
        let mut values = std::mem::take(&mut self.values);
        for vs in &mut values {
            vs.sort_by(|(a, _), (b, _)| self.order(a, b));
        }
        self.values = values;
        self
    }

    fn bytes(&self, k: &ValueKey) -> &[u8] {
        self.value_bytes
            .get(k.at as usize..k.at as usize + k.len as usize)
            .unwrap_or_default()
    }

    fn order(&self, a: &ValueKey, b: &ValueKey) -> std::cmp::Ordering {
        (a.head, a.len)
            .cmp(&(b.head, b.len))
            .then_with(|| self.bytes(a).cmp(self.bytes(b)))
    }

    /// The pair of name `values` whose value is `have`.
    fn find(&self, values: &[(ValueKey, u32)], have: &[u8]) -> Option<u32> {
        let (head, len) = (value_head(have), have.len() as u32);
        values
            .binary_search_by(|(k, _)| {
                (k.head, k.len)
                    .cmp(&(head, len))
                    .then_with(|| self.bytes(k).cmp(have))
            })
            .ok()
            .map(|j| values[j].1)
    }

    /// Drops the routes matching on header `name` whose required values of
    /// it the request lacks.
    fn filter(&self, name: u32, headers: &HeaderMap, s: &mut Scratch) {
        let (Some(header), Some(values), Some(routes)) = (
            self.names.get(name as usize),
            self.values.get(name as usize),
            self.name_routes.get(name as usize),
        ) else {
            return;
        };
        let ok = cleared(&mut s.ok);
        for have in headers.get_all(header) {
            if let Some(pair) = self.find(values, have.as_bytes()) {
                set_bit(&mut s.pair_ok, pair);
                if let Some(r) = self.pair_routes.get(pair as usize) {
                    r.or_into(ok);
                }
            }
        }
        for (route, pairs) in self.several.get(name as usize).into_iter().flatten() {
            if !pairs.iter().all(|&p| bit_set(&s.pair_ok, p)) {
                clear_bit(ok, *route);
            }
        }
        routes.keep_only(&mut s.alive, &s.ok);
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
    // Values longer than 8 bytes sharing their first 8.
    const VALUES: &[&str] = &["1", "2", "v", "tenant-blue-1", "tenant-blue-2"];
    const REQUEST_VALUES: &[&str] = &[
        "1",
        "2",
        "v",
        "V",
        "tenant-blue-1",
        "tenant-blue-2",
        "tenant-blue-3",
        "tenant-b",
    ];

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
                    .map(|k| format!("{k}: '{}'", pick_from(rng, VALUES)))
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
                pick_from(rng, REQUEST_VALUES),
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
