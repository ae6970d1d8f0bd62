//! `routes[]` (and `defaults`): match, concurrency, queue, timeouts, retries, fallback.

use super::*;

impl Validator<'_> {
    /// `concurrency`: a fixed `max_in_flight`, or `auto` with `adaptive`
    /// bounds (`1 <= min <= initial <= max`, `tolerance > 1`). An `adaptive`
    /// block is an error where `max_in_flight` is a number; one in
    /// `defaults` applies only to routes that say `auto`.
    pub(super) fn concurrency(
        &mut self,
        i: usize,
        r: &RawRoute,
        d: &RawRoute,
    ) -> ConcurrencyConfig {
        let (raw, pth) = pick(
            i,
            r,
            d,
            |x| x.concurrency.as_ref()?.max_in_flight.clone(),
            "concurrency.max_in_flight",
        );
        let (adaptive, a_path) = pick(
            i,
            r,
            d,
            |x| x.concurrency.as_ref()?.adaptive.clone(),
            "concurrency.adaptive",
        );
        let fixed = match raw {
            Some(RawMaxInFlight::Word(w)) if w == "auto" => None,
            Some(RawMaxInFlight::Word(w)) => {
                self.error(&pth, format!("expected a number or `auto`, found `{w}`"));
                Some(1024)
            }
            Some(RawMaxInFlight::Count(n)) => Some(self.positive(&pth, Some(n), 1024)),
            None => Some(1024),
        };
        if let Some(max_in_flight) = fixed {
            // `adaptive` in `defaults` serves the routes that say `auto`; one
            // written next to a number (or in a route without `auto`) is wrong.
            if adaptive.is_some() && (a_path.starts_with("routes") || pth.starts_with("defaults")) {
                self.error(
                    &a_path,
                    "`adaptive` applies only with `max_in_flight: auto`",
                );
            }
            return ConcurrencyConfig {
                max_in_flight,
                adaptive: None,
            };
        }
        let a = adaptive.unwrap_or_default();
        let min = self.positive(&format!("{a_path}.min"), a.min, 1);
        let max = self.positive(&format!("{a_path}.max"), a.max, 1024);
        let initial = self.positive(
            &format!("{a_path}.initial"),
            a.initial,
            16.clamp(min, max.max(min)),
        );
        if min > max {
            self.error(
                &format!("{a_path}.min"),
                format!("min ({min}) must not exceed max ({max})"),
            );
        } else if !(min..=max).contains(&initial) {
            self.error(
                &format!("{a_path}.initial"),
                format!("initial ({initial}) must be between min ({min}) and max ({max})"),
            );
        }
        let tolerance = a.tolerance.unwrap_or(2.0);
        if !(tolerance > 1.0 && tolerance.is_finite()) {
            self.error(
                &format!("{a_path}.tolerance"),
                format!("tolerance ({tolerance}) must be greater than 1, e.g. 2.0"),
            );
        }
        ConcurrencyConfig {
            max_in_flight: initial,
            adaptive: Some(AdaptiveConfig {
                min,
                max,
                initial,
                tolerance,
            }),
        }
    }

    /// Validates `routes[i]` merged with `defaults:` `d`; records problems, builds a route anyway.
    pub(super) fn route(
        &mut self,
        i: usize,
        r: &RawRoute,
        d: &RawRoute,
        upstreams: &[&str],
    ) -> Option<RouteConfig> {
        let p = format!("routes[{i}]");
        let name = match &r.name {
            Some(n) if valid_name(n) => n.clone(),
            Some(n) => {
                self.error(&format!("{p}.name"), format!("route name `{n}` must be 1-64 characters of letters, digits, `-`, `_` or `.` (it is a metric label)"));
                n.clone()
            }
            None => {
                self.error(&p, "missing field `name`: every route needs a unique name");
                format!("route{i}")
            }
        };
        let matcher = self.matcher(&format!("{p}.match"), r.matcher.as_ref());
        let (upstream, up_path) = pick(i, r, d, |x| x.upstream.clone(), "upstream");
        let upstream = match upstream {
            Some(u) if upstreams.contains(&u.as_str()) => u,
            Some(u) => {
                let hint = match did_you_mean(&u, upstreams.iter().copied()) {
                    Some(s) => format!(" (did you mean `{s}`?)"),
                    None if upstreams.is_empty() => " (no upstreams are defined)".to_string(),
                    None => format!(" (defined: {})", upstreams.join(", ")),
                };
                self.error(&up_path, format!("unknown upstream `{u}`{hint}"));
                u
            }
            None => {
                self.error(&p, "missing field `upstream`: name one of `upstreams`");
                String::new()
            }
        };

        let concurrency = self.concurrency(i, r, d);

        let (max_depth, _) = pick(i, r, d, |x| x.queue.as_ref()?.max_depth, "queue.max_depth");
        let max_depth = max_depth.unwrap_or(1024).min(1 << 24) as usize;
        let (max_wait, wait_path) = pick(i, r, d, |x| x.queue.as_ref()?.max_wait, "queue.max_wait");
        let (discipline, pth) = pick(
            i,
            r,
            d,
            |x| x.queue.as_ref()?.discipline.clone(),
            "queue.discipline",
        );
        let discipline = match discipline.as_deref() {
            None | Some("fifo") => QueueDiscipline::Fifo,
            Some("adaptive_lifo") => QueueDiscipline::AdaptiveLifo,
            Some(other) => {
                self.one_of(&pth, other, &["fifo", "adaptive_lifo"]);
                QueueDiscipline::Fifo
            }
        };

        let (request, req_path) = pick(
            i,
            r,
            d,
            |x| x.timeouts.as_ref()?.request,
            "timeouts.request",
        );
        let request_written = request.is_some();
        let request = request.unwrap_or(Dur(DEFAULT_REQUEST_TIMEOUT));
        if request.0.is_zero() {
            self.error(&req_path, "must be greater than 0s");
        }
        let (per_try, pt_path) = pick(
            i,
            r,
            d,
            |x| x.timeouts.as_ref()?.per_try,
            "timeouts.per_try",
        );
        if let Some(pt) = per_try {
            if pt.0.is_zero() {
                self.error(&pt_path, "must be greater than 0s");
            } else if pt > request {
                self.bound_by_deadline(
                    i,
                    (&pt_path, pt, "must not exceed", "exceeds"),
                    (&req_path, request, request_written),
                    "the deadline ends every attempt first",
                );
            }
        }
        // An unset max_wait follows the deadline: a default never contradicts
        // what the user wrote.
        let max_wait = match max_wait {
            Some(w) => {
                if max_depth > 0 && w >= request {
                    self.bound_by_deadline(
                        i,
                        (&wait_path, w, "must be less than", "is not less than"),
                        (&req_path, request, request_written),
                        "the deadline ends the wait first",
                    );
                }
                w
            }
            None => Dur(DEFAULT_MAX_WAIT.min(request.0)),
        };
        let (body_idle, pth) = pick(
            i,
            r,
            d,
            |x| x.timeouts.as_ref()?.response_body_idle,
            "timeouts.response_body_idle",
        );
        let response_body_idle = body_idle.unwrap_or(Dur(Duration::from_secs(60)));
        if response_body_idle.0.is_zero() {
            self.error(&pth, "must be greater than 0s");
        }

        let retries = self.retries(i, r, d);

        let (status, pth) = pick(i, r, d, |x| x.shed.as_ref()?.status, "shed.status");
        let status = match status {
            None => 429,
            Some(s) if (400..=599).contains(&s) => s as u16,
            Some(s) => {
                self.error(&pth, format!("shed status {s} must be a 4xx or 5xx code"));
                429
            }
        };
        let (retry_after, _) = pick(
            i,
            r,
            d,
            |x| x.shed.as_ref()?.retry_after,
            "shed.retry_after",
        );
        let shed = ShedConfig {
            status,
            retry_after: retry_after.unwrap_or(Dur(Duration::from_secs(1))),
        };
        let (fallback, pth) = pick(i, r, d, |x| x.fallback.clone(), "fallback");
        let fallback = fallback.map(|f| self.fallback(&pth, &f));
        let (max_body, _) = pick(i, r, d, |x| x.max_request_body, "max_request_body");
        let (raw_priority, pp) = pick(i, r, d, |x| x.priority.clone(), "priority");
        let priority = raw_priority.and_then(|x| self.priority(&pp, &x));
        let (raw_fairness, fp) = pick(i, r, d, |x| x.fairness.clone(), "fairness");
        let fairness = raw_fairness.and_then(|x| self.fairness(&fp, &x));
        let (raw_mode, mp) = pick(i, r, d, |x| x.mode.clone(), "mode");
        let mode = self.mode(&mp, raw_mode.as_deref());
        Some(RouteConfig {
            name,
            matcher,
            upstream,
            concurrency,
            queue: QueueConfig {
                max_depth,
                max_wait,
                discipline,
            },
            timeouts: TimeoutsConfig {
                request,
                per_try,
                response_body_idle,
            },
            retries,
            shed,
            fallback,
            max_request_body: max_body.unwrap_or(Size(10 << 20)),
            priority,
            fairness,
            mode,
        })
    }

    /// A value written by the user that the route's deadline bounds. Both
    /// written: an error naming both as written. The deadline is the default:
    /// only a warning, since a default must not make a config invalid and the
    /// deadline bounds the value at run time anyway.
    pub(super) fn bound_by_deadline(
        &mut self,
        i: usize,
        (path, value, relation, relation_now): (&str, Dur, &str, &str),
        (req_path, request, req_written): (&str, Dur, bool),
        consequence: &str,
    ) {
        let value = units::format_duration(value.0);
        let request = units::format_duration(request.0);
        let name = field_name(i, path);
        if req_written {
            // Point at the route's own line when one of the two comes from `defaults`.
            let at = if path.starts_with("defaults.") && !req_path.starts_with("defaults.") {
                req_path
            } else {
                path
            };
            let req_name = field_name(i, req_path);
            self.error(
                at,
                format!("{name} ({value}) {relation} {req_name} ({request})"),
            );
        } else {
            self.warn(
                path,
                format!(
                    "{name} ({value}) {relation_now} the default timeouts.request ({request}): {consequence}; set `timeouts.request` to say which is meant"
                ),
            );
        }
    }

    /// Validates a route's `match:` block at path `p`; no block matches every request.
    pub(super) fn matcher(&mut self, p: &str, m: Option<&RawMatch>) -> MatchConfig {
        let Some(m) = m else {
            return MatchConfig {
                path: PathMatch::Any,
                methods: None,
                host: None,
                headers: Vec::new(),
            };
        };
        let set = [
            m.path_prefix.is_some(),
            m.path_exact.is_some(),
            m.path_regex.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set > 1 {
            self.error(
                p,
                "set only one of `path_prefix`, `path_exact`, `path_regex`",
            );
        }
        let path = if let Some(prefix) = &m.path_prefix {
            if !prefix.starts_with('/') {
                self.error(
                    &format!("{p}.path_prefix"),
                    format!("a path prefix must start with `/`, got `{prefix}`"),
                );
            }
            PathMatch::Prefix(prefix.clone())
        } else if let Some(exact) = &m.path_exact {
            if !exact.starts_with('/') {
                self.error(
                    &format!("{p}.path_exact"),
                    format!("a path must start with `/`, got `{exact}`"),
                );
            }
            PathMatch::Exact(exact.clone())
        } else if let Some(re) = &m.path_regex {
            match compile_path_regex(re) {
                Ok(anchored) => PathMatch::Regex(PathRegex {
                    source: re.clone(),
                    anchored,
                }),
                Err(msg) => {
                    self.error(
                        &format!("{p}.path_regex"),
                        format!("regex does not compile: {msg}"),
                    );
                    PathMatch::Any
                }
            }
        } else {
            PathMatch::Any
        };
        let methods = m.methods.as_ref().map(|list| {
            list.iter()
                .enumerate()
                .filter_map(|(j, s)| {
                    let upper = s.to_ascii_uppercase();
                    match Method::from_bytes(upper.as_bytes()) {
                        Ok(method) => Some(method),
                        Err(_) => {
                            self.error(
                                &format!("{p}.methods[{j}]"),
                                format!("`{s}` is not an HTTP method"),
                            );
                            None
                        }
                    }
                })
                .collect()
        });
        let host = m.host.as_ref().map(|h| {
            let h = h.to_ascii_lowercase();
            if h.is_empty()
                || (h.contains('*') && !(h.starts_with("*.") && h.matches('*').count() == 1))
            {
                self.error(
                    &format!("{p}.host"),
                    format!("expected an exact host or `*.suffix`, got `{h}`"),
                );
            }
            h
        });
        let headers = self.header_list(&format!("{p}.headers"), m.headers.as_ref());
        MatchConfig {
            path,
            methods,
            host,
            headers,
        }
    }

    /// Validates `routes[i].retries`, each field from the route or else from `defaults:`.
    pub(super) fn retries(&mut self, i: usize, r: &RawRoute, d: &RawRoute) -> RetriesConfig {
        let (max_attempts, pth) = pick(
            i,
            r,
            d,
            |x| x.retries.as_ref()?.max_attempts,
            "retries.max_attempts",
        );
        let max_attempts = match max_attempts {
            None => 1,
            Some(n) if (1..=10).contains(&n) => n as u32,
            Some(n) => {
                self.error(
                    &pth,
                    format!("max_attempts must be from 1 (no retry) to 10, got {n}"),
                );
                1
            }
        };
        let (on, pth) = pick(i, r, d, |x| x.retries.as_ref()?.on.clone(), "retries.on");
        let on = match on {
            None => RetryOnConfig {
                connect: true,
                reset: true,
                timeout: true,
                statuses: vec![502, 503, 504],
            },
            Some(list) => {
                let mut out = RetryOnConfig::default();
                for (j, item) in list.iter().enumerate() {
                    match item {
                        RawRetryOn::Status(s) if (500..=599).contains(s) => {
                            out.statuses.push(*s as u16)
                        }
                        RawRetryOn::Status(s) => self.error(
                            &format!("{pth}[{j}]"),
                            format!("retry status {s} must be a 5xx code"),
                        ),
                        RawRetryOn::Word(w) => match w.as_str() {
                            "connect" => out.connect = true,
                            "reset" => out.reset = true,
                            "timeout" => out.timeout = true,
                            "5xx" => out.statuses.extend(500..=599),
                            other => match other.parse::<u16>() {
                                Ok(s) if (500..=599).contains(&s) => out.statuses.push(s),
                                _ => self.one_of(
                                    &format!("{pth}[{j}]"),
                                    other,
                                    &["connect", "reset", "timeout", "5xx", "502", "503", "504"],
                                ),
                            },
                        },
                    }
                }
                // Sorted and unique: the data path binary-searches it.
                out.statuses.sort_unstable();
                out.statuses.dedup();
                out
            }
        };
        let (base, base_path) = pick(
            i,
            r,
            d,
            |x| x.retries.as_ref()?.backoff.as_ref()?.base,
            "retries.backoff.base",
        );
        let (max, max_path) = pick(
            i,
            r,
            d,
            |x| x.retries.as_ref()?.backoff.as_ref()?.max,
            "retries.backoff.max",
        );
        let base = base.unwrap_or(Dur(Duration::from_millis(25)));
        // An unset max follows a longer base instead of contradicting it.
        let max = match max {
            Some(m) => {
                if m < base {
                    self.error(
                        &max_path,
                        format!(
                            "{} ({}) must be at least {} ({})",
                            field_name(i, &max_path),
                            units::format_duration(m.0),
                            field_name(i, &base_path),
                            units::format_duration(base.0)
                        ),
                    );
                }
                m
            }
            None => Dur(DEFAULT_BACKOFF_MAX.max(base.0)),
        };
        let backoff = BackoffConfig { base, max };
        let (ratio, rpath) = pick(
            i,
            r,
            d,
            |x| x.retries.as_ref()?.budget.as_ref()?.ratio,
            "retries.budget.ratio",
        );
        let ratio = ratio.unwrap_or(0.2);
        if !(0.0..=1000.0).contains(&ratio) {
            self.error(
                &rpath,
                "budget.ratio must be from 0 to 1000 (0.2 = retries may add 20% load)",
            );
        }
        let (mps, _) = pick(
            i,
            r,
            d,
            |x| x.retries.as_ref()?.budget.as_ref()?.min_per_second,
            "retries.budget.min_per_second",
        );
        let (mbb, _) = pick(
            i,
            r,
            d,
            |x| x.retries.as_ref()?.max_buffered_body,
            "retries.max_buffered_body",
        );
        let (key, kpath) = pick(
            i,
            r,
            d,
            |x| x.retries.as_ref()?.idempotency_key_header.clone(),
            "retries.idempotency_key_header",
        );
        let idempotency_key_header = key.and_then(|k| match HeaderName::from_bytes(k.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error(&kpath, format!("`{k}` is not a valid header name"));
                None
            }
        });
        RetriesConfig {
            max_attempts,
            on,
            backoff,
            budget: BudgetSettings {
                ratio,
                min_per_second: mps.unwrap_or(10).min(1_000_000) as u32,
            },
            max_buffered_body: mbb.unwrap_or(Size(64 << 10)),
            idempotency_key_header,
        }
    }

    /// Validates a `fallback:` block at path `p`: status (default 200), headers and body.
    pub(super) fn fallback(&mut self, p: &str, f: &RawFallback) -> FallbackConfig {
        let status = match f.status {
            None => 200,
            Some(s) if (100..=599).contains(&s) && s != 101 => s as u16,
            Some(s) => {
                self.error(
                    &format!("{p}.status"),
                    format!("`{s}` is not a usable HTTP status"),
                );
                200
            }
        };
        let body = f.body.clone().unwrap_or_default();
        if body.len() > (1 << 20) {
            self.error(&format!("{p}.body"), "a fallback body is limited to 1MiB");
        }
        FallbackConfig {
            status,
            headers: self.header_list(&format!("{p}.headers"), f.headers.as_ref()),
            body,
        }
    }
}
