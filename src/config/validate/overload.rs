//! Validation of the overload-control fields beyond a fixed cap: priority
//! classes, fairness and shadow mode (docs/config.md, "Priority, fairness
//! and shadow mode").

use http::HeaderName;

use super::super::schema::{RawFairness, RawPriority, RawShare};
use super::super::{FairKey, FairnessConfig, Mode, PriorityConfig};
use super::{valid_name, Validator};

/// Most priority classes.
const MAX_CLASSES: usize = 8;
/// Upper bound of `fairness.max_keys` (each tracked key costs a few dozen bytes).
const MAX_KEYS_BOUND: u64 = 1 << 20;

impl Validator<'_> {
    /// `mode:` of a route or a breaker.
    pub(super) fn mode(&mut self, path: &str, v: Option<&str>) -> Mode {
        match v {
            None | Some("enforce") => Mode::Enforce,
            Some("shadow") => Mode::Shadow,
            Some(other) => {
                self.one_of(path, other, &["enforce", "shadow"]);
                Mode::Enforce
            }
        }
    }

    /// `priority:` — 2 to 8 unique class names, a default that names one,
    /// reserved shares that name classes and add up to less than 100%.
    pub(super) fn priority(&mut self, p: &str, r: &RawPriority) -> Option<PriorityConfig> {
        let header = r.header.as_deref().unwrap_or("x-spillway-priority");
        let header = match HeaderName::from_bytes(header.as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                self.error(
                    &format!("{p}.header"),
                    format!("`{header}` is not a valid header name"),
                );
                return None;
            }
        };
        let Some(classes) = r.classes.clone() else {
            self.error(
                p,
                "missing field `classes`: name 2 to 8 classes, highest first (e.g. [critical, default, sheddable])",
            );
            return None;
        };
        let mut ok = true;
        if !(2..=MAX_CLASSES).contains(&classes.len()) {
            self.error(
                &format!("{p}.classes"),
                format!(
                    "expected 2 to {MAX_CLASSES} class names, got {}",
                    classes.len()
                ),
            );
            ok = false;
        }
        for (i, c) in classes.iter().enumerate() {
            if !valid_name(c) {
                self.error(&format!("{p}.classes[{i}]"), format!("class name `{c}` must be 1-64 characters of letters, digits, `-`, `_` or `.` (it is a metric label)"));
                ok = false;
            } else if classes[..i].contains(c) {
                self.error(
                    &format!("{p}.classes[{i}]"),
                    format!("duplicate class `{c}`: class names must be unique"),
                );
                ok = false;
            }
        }
        let default = match r.default.as_deref() {
            Some(d) => match classes.iter().position(|c| c == d) {
                Some(i) => i,
                None => {
                    self.error(
                        &format!("{p}.default"),
                        format!("`{d}` is not one of the classes ({})", classes.join(", ")),
                    );
                    ok = false;
                    0
                }
            },
            None => match classes.iter().position(|c| c == "default") {
                Some(i) => i,
                None => {
                    self.error(
                        p,
                        "missing field `default`: name the class of requests without (or with an unknown) class header",
                    );
                    ok = false;
                    0
                }
            },
        };
        let mut reserved = vec![0.0; classes.len()];
        let mut total = 0.0;
        for (name, share) in r.reserved.iter().flatten() {
            let path = format!("{p}.reserved.{name}");
            let Some(i) = classes.iter().position(|c| c == name) else {
                self.error(
                    &path,
                    format!(
                        "`{name}` is not one of the classes ({})",
                        classes.join(", ")
                    ),
                );
                ok = false;
                continue;
            };
            let Some(f) = share_fraction(share) else {
                self.error(
                    &path,
                    "expected a share like `20%` (or a fraction like 0.2)",
                );
                ok = false;
                continue;
            };
            if i + 1 == classes.len() && f > 0.0 {
                self.warn(
                    &path,
                    format!("`{name}` is the lowest class: no class below it could take its share, so reserving it changes nothing"),
                );
            }
            reserved[i] = f;
            total += f;
        }
        if total >= 1.0 - 1e-9 {
            self.error(
                &format!("{p}.reserved"),
                format!(
                    "reserved shares add up to {:.0}%: they must leave part of the limit to the lower classes (less than 100%)",
                    total * 100.0
                ),
            );
            ok = false;
        }
        ok.then_some(PriorityConfig {
            header,
            classes,
            default,
            reserved,
        })
    }

    /// `fairness:` — exactly one key source, a bounded key set.
    pub(super) fn fairness(&mut self, p: &str, f: &RawFairness) -> Option<FairnessConfig> {
        let key = f.key.clone().unwrap_or_default();
        let mut sources = Vec::new();
        if let Some(h) = &key.header {
            match HeaderName::from_bytes(h.as_bytes()) {
                Ok(h) => sources.push(FairKey::Header(h)),
                Err(_) => {
                    self.error(
                        &format!("{p}.key.header"),
                        format!("`{h}` is not a valid header name"),
                    );
                    return None;
                }
            }
        }
        if key.client_ip == Some(true) {
            sources.push(FairKey::ClientIp);
        }
        if key.client_identity == Some(true) {
            sources.push(FairKey::ClientIdentity);
        }
        if sources.len() != 1 {
            self.error(
                &format!("{p}.key"),
                format!(
                    "expected exactly one key source ({{ header: NAME }}, {{ client_ip: true }} or {{ client_identity: true }}), got {}",
                    sources.len()
                ),
            );
            return None;
        }
        let max_keys = match f.max_keys {
            None => 1024,
            Some(n) if (1..=MAX_KEYS_BOUND).contains(&n) => n as usize,
            Some(n) => {
                self.error(
                    &format!("{p}.max_keys"),
                    format!("expected 1 to {MAX_KEYS_BOUND}, got {n}"),
                );
                return None;
            }
        };
        Some(FairnessConfig {
            key: sources.remove(0),
            max_keys,
        })
    }
}

/// `20%`, `12.5%` or a fraction in [0, 1).
fn share_fraction(s: &RawShare) -> Option<f64> {
    let f = match s {
        RawShare::Number(n) => *n,
        RawShare::Text(t) => t.trim().strip_suffix('%')?.trim().parse::<f64>().ok()? / 100.0,
    };
    (f.is_finite() && (0.0..1.0).contains(&f)).then_some(f)
}
