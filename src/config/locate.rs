//! Maps YAML paths (`routes[2].queue.max_wait`) to where they are written, so that
//! semantic errors found after deserialization still point at a line and column,
//! and a deserialization error's position can be named by its field path.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// Where a path's key and value start (1-based line and column).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Pos {
    pub line: u64,
    pub column: u64,
}

/// Path -> position of its value (and of its key for mapping entries).
#[derive(Debug, Default)]
pub(crate) struct Locations {
    values: HashMap<String, Pos>,
    /// Every mapping entry in document order, with the text it spans.
    entries: Vec<Entry>,
    /// Every value in document order, for "which path is at this line".
    ordered: Vec<(Pos, String)>,
}

/// One `key: value` of a mapping as written.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// Path of the value (`routes[0].queue`); its parent holds the key.
    pub path: String,
    /// Where the key starts.
    pub key: Pos,
    /// Bytes from the key's start to the end of its value (the value's last
    /// character; comments and line breaks after it are not included).
    pub span: std::ops::Range<usize>,
    /// In a block mapping (not `{...}`).
    pub block: bool,
}

enum Frame {
    Map {
        path: String,
        block: bool,
        key: Option<String>,
        /// The entry whose key was just read, until its value is complete.
        open: Option<usize>,
        /// The entry this mapping is the value of.
        owner: Option<usize>,
    },
    Seq {
        path: String,
        index: usize,
        owner: Option<usize>,
    },
}

impl Locations {
    /// Walks the YAML events; a syntax error just ends the walk (the deserializer
    /// reports it with its own position).
    pub(crate) fn build(text: &str) -> Self {
        let mut out = Locations::default();
        let mut stack: Vec<Frame> = Vec::new();
        // Bounded: the deserializer refuses absurd depth anyway; this only guards the walk.
        const MAX_DEPTH: usize = 256;
        // Containers past MAX_DEPTH are not tracked; their end events are skipped.
        let mut untracked = 0usize;
        // End (in bytes) of the last character of content seen so far.
        let mut last_end = 0usize;
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let pos = Pos {
                line: span.start.line() as u64,
                column: span.start.col() as u64 + 1,
            };
            let range = span.byte_range().unwrap_or(0..0);
            let is_node_start = matches!(
                event,
                Event::Scalar(..)
                    | Event::MappingStart(..)
                    | Event::SequenceStart(..)
                    | Event::Alias(..)
            );
            if is_node_start {
                let is_container =
                    matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
                if untracked > 0 {
                    if is_container {
                        untracked += 1;
                    }
                    last_end = last_end.max(range.end);
                    continue;
                }
                if !is_container {
                    last_end = last_end.max(range.end);
                }
                // A mapping expecting a key: this node is the key.
                if let Some(Frame::Map {
                    path,
                    key,
                    open,
                    block,
                    ..
                }) = stack.last_mut()
                {
                    if key.is_none() {
                        let name = match &event {
                            Event::Scalar(s, ..) => s.to_string(),
                            _ => "?".to_string(),
                        };
                        let full = join_key(path, &name);
                        *open = Some(out.entries.len());
                        out.entries.push(Entry {
                            path: full,
                            key: pos,
                            span: range.start..range.end,
                            block: *block,
                        });
                        *key = Some(name);
                        if is_container {
                            // Complex keys are not used by this schema; skip their content.
                            untracked += 1;
                        }
                        continue;
                    }
                }
                // The entry (if any) this node is the value of.
                let (path, owner) = match stack.last_mut() {
                    Some(Frame::Map {
                        path, key, open, ..
                    }) => {
                        let k = key.take().unwrap_or_default();
                        (join_key(path, &k), open.take())
                    }
                    Some(Frame::Seq { path, index, .. }) => {
                        let p = format!("{path}[{index}]");
                        *index += 1;
                        (p, None)
                    }
                    None => (String::new(), None),
                };
                out.values.entry(path.clone()).or_insert(pos);
                out.ordered.push((pos, path.clone()));
                if !is_container {
                    if let Some(e) = owner.and_then(|o| out.entries.get_mut(o)) {
                        e.span.end = past_colon(text, e.span.end.max(range.end));
                    }
                } else if stack.len() < MAX_DEPTH {
                    match event {
                        Event::MappingStart(..) => stack.push(Frame::Map {
                            path,
                            block: !text[range.start.min(text.len())..].starts_with('{'),
                            key: None,
                            open: None,
                            owner,
                        }),
                        _ => stack.push(Frame::Seq {
                            path,
                            index: 0,
                            owner,
                        }),
                    }
                } else {
                    untracked += 1;
                }
            } else if matches!(event, Event::MappingEnd | Event::SequenceEnd) {
                // A flow collection ends with its bracket; a block one ends
                // where the next token starts, which is not part of it.
                if text[..range.end.min(text.len())].ends_with(['}', ']']) {
                    last_end = last_end.max(range.end);
                }
                if untracked > 0 {
                    untracked -= 1;
                    continue;
                }
                let owner = match stack.pop() {
                    Some(Frame::Map { owner, .. } | Frame::Seq { owner, .. }) => owner,
                    None => None,
                };
                if let Some(e) = owner.and_then(|o| out.entries.get_mut(o)) {
                    e.span.end = past_colon(text, last_end.max(e.span.end));
                }
            }
        }
        out
    }

    /// The value's position, else the nearest ancestor's.
    pub(crate) fn value(&self, path: &str) -> Option<Pos> {
        let mut p = path;
        loop {
            if let Some(pos) = self.values.get(p) {
                return Some(*pos);
            }
            p = parent(p)?;
        }
    }

    /// The mapping entry whose key starts exactly here (where an unknown-field
    /// error points).
    pub(crate) fn key_at(&self, line: u64, column: u64) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| (e.key.line, e.key.column) == (line, column))
    }

    /// The mapping entry that holds `path`, or the nearest ancestor that is one
    /// (`a.list[2]` -> `a.list`).
    pub(crate) fn entry(&self, path: &str) -> Option<&Entry> {
        let mut p = path;
        loop {
            if let Some(e) = self.entries.iter().find(|e| e.path == p) {
                return Some(e);
            }
            p = parent(p)?;
        }
    }

    /// How many keys the mapping holding `entry` has.
    pub(crate) fn siblings(&self, entry: &Entry) -> usize {
        let holder = parent(&entry.path);
        self.entries
            .iter()
            .filter(|e| parent(&e.path) == holder)
            .count()
    }

    /// The deepest path whose value starts at or before this position: names the
    /// field a deserialization error is about.
    pub(crate) fn path_at(&self, line: u64, column: u64) -> Option<&str> {
        self.ordered
            .iter()
            .rev()
            .find(|(p, _)| (p.line, p.column) <= (line, column))
            .map(|(_, path)| path.as_str())
    }
}

/// An empty value (`key:` alone) ends at its key: the entry then ends past the `:`.
fn past_colon(text: &str, end: usize) -> usize {
    let rest = text.get(end..).unwrap_or("");
    let trimmed = rest.trim_start_matches([' ', '\t']);
    if trimmed.starts_with(':') {
        end + (rest.len() - trimmed.len()) + 1
    } else {
        end
    }
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> `` -> None.
pub(crate) fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_positions() {
        let y = "version: 1\nroutes:\n  - name: a\n    queue:\n      max_wait: 2s\n  - name: b\n";
        let l = Locations::build(y);
        let p = l.value("routes[0].queue.max_wait").unwrap();
        assert_eq!((p.line, p.column), (5, 17));
        let k = l.entry("routes[1].name").unwrap().key;
        assert_eq!((k.line, k.column), (6, 5));
        // Missing leaf falls back to its parent.
        let p = l.value("routes[0].queue.max_depth").unwrap();
        assert_eq!(p.line, 5);
        assert_eq!(l.path_at(5, 20), Some("routes[0].queue.max_wait"));
    }

    #[test]
    fn entry_spans_cover_key_and_value() {
        let t = "a:\n  m:\n  p: |\n    x\n  q: {r: [1, 2]}  # c\n  s: 'v'\n";
        let l = Locations::build(t);
        let text = |p: &str| &t[l.entry(p).expect(p).span.clone()];
        assert_eq!(text("a.m"), "m:");
        assert!(text("a.p").starts_with("p: |\n    x"));
        assert_eq!(text("a.q"), "q: {r: [1, 2]}");
        assert_eq!(text("a.q.r"), "r: [1, 2]");
        assert_eq!(text("a.s"), "s: 'v'");
        assert!(text("a").ends_with("s: 'v'"));
    }
}
