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
    keys: HashMap<String, Pos>,
    /// Every value in document order, for "which path is at this line".
    ordered: Vec<(Pos, String)>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

impl Locations {
    /// Walks the YAML events; a syntax error just ends the walk (the deserializer
    /// reports it with its own position).
    pub(crate) fn build(text: &str) -> Self {
        let mut out = Locations::default();
        let mut stack: Vec<Frame> = Vec::new();
        // Bounded: the deserializer refuses absurd depth anyway; this only guards the walk.
        const MAX_DEPTH: usize = 256;
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let pos = Pos {
                line: span.start.line() as u64,
                column: span.start.col() as u64 + 1,
            };
            let is_node_start = matches!(
                event,
                Event::Scalar(..)
                    | Event::MappingStart(..)
                    | Event::SequenceStart(..)
                    | Event::Alias(..)
            );
            if is_node_start {
                // A mapping expecting a key: this node is the key.
                if let Some(Frame::Map { path, key }) = stack.last_mut() {
                    if key.is_none() {
                        let name = match &event {
                            Event::Scalar(s, ..) => s.to_string(),
                            _ => "?".to_string(),
                        };
                        let full = join_key(path, &name);
                        out.keys.insert(full, pos);
                        *key = Some(name);
                        if let Event::MappingStart(..) | Event::SequenceStart(..) = event {
                            // Complex keys are not used by this schema; skip their content.
                            stack.push(Frame::Map {
                                path: "?".into(),
                                key: None,
                            });
                        }
                        continue;
                    }
                }
                let path = match stack.last_mut() {
                    Some(Frame::Map { path, key }) => {
                        let k = key.take().unwrap_or_default();
                        join_key(path, &k)
                    }
                    Some(Frame::Seq { path, index }) => {
                        let p = format!("{path}[{index}]");
                        *index += 1;
                        p
                    }
                    None => String::new(),
                };
                out.values.entry(path.clone()).or_insert(pos);
                out.ordered.push((pos, path.clone()));
                if stack.len() < MAX_DEPTH {
                    match event {
                        Event::MappingStart(..) => stack.push(Frame::Map { path, key: None }),
                        Event::SequenceStart(..) => stack.push(Frame::Seq { path, index: 0 }),
                        _ => {}
                    }
                }
            } else if matches!(event, Event::MappingEnd | Event::SequenceEnd) {
                stack.pop();
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

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> `` -> None.
fn parent(path: &str) -> Option<&str> {
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
        let k = l.keys.get("routes[1].name").unwrap();
        assert_eq!((k.line, k.column), (6, 5));
        // Missing leaf falls back to its parent.
        let p = l.value("routes[0].queue.max_depth").unwrap();
        assert_eq!(p.line, 5);
        assert_eq!(l.path_at(5, 20), Some("routes[0].queue.max_wait"));
    }
}
