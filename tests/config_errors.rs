//! Config validation (docs/config.md): every error class names the file, line and
//! column, the field path, what was expected and, where it applies, the
//! closest valid name; and `spillway check` exit codes.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use spillway::config::{load_str, ConfigIssue};
use support::TempDir;

const FILE: &str = "t.yaml";

/// 1-based (line, column) of the first occurrence of `needle`; panics if the
/// needle is missing or not unique, so expectations stay unambiguous.
fn pos(text: &str, needle: &str) -> (u64, u64) {
    let idx = text
        .find(needle)
        .unwrap_or_else(|| panic!("`{needle}` not in config"));
    assert_eq!(
        text.matches(needle).count(),
        1,
        "`{needle}` is not unique in the config"
    );
    let before = &text[..idx];
    let line = before.matches('\n').count() as u64 + 1;
    let col = (idx - before.rfind('\n').map(|i| i + 1).unwrap_or(0)) as u64 + 1;
    (line, col)
}

fn issues(yaml: &str) -> Vec<ConfigIssue> {
    match load_str(yaml, FILE) {
        Ok(_) => panic!("config should be rejected:\n{yaml}"),
        Err(e) => {
            assert!(
                !e.issues.is_empty(),
                "a ConfigError must carry at least one issue"
            );
            // Display: one issue per line.
            let shown = e.to_string();
            for issue in &e.issues {
                assert!(
                    shown.contains(&issue.to_string()),
                    "Display lists every issue:\n{shown}"
                );
            }
            e.issues
        }
    }
}

fn show(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Finds the issue whose path starts with `path` and checks its file, line,
/// column (one of `cols`) and that its message contains every `needles`.
fn expect_issue<'a>(
    all: &'a [ConfigIssue],
    path: &str,
    line: u64,
    cols: &[u64],
    needles: &[&str],
) -> &'a ConfigIssue {
    let issue = all
        .iter()
        .find(|i| {
            i.path == path
                || i.path.starts_with(&format!("{path}."))
                || i.path.starts_with(&format!("{path}["))
        })
        .unwrap_or_else(|| panic!("no issue for `{path}` in:\n{}", show(all)));
    assert_eq!(issue.file, FILE, "{issue}");
    assert_eq!(issue.line, Some(line), "line of: {issue}");
    let col = issue
        .column
        .unwrap_or_else(|| panic!("no column in: {issue}"));
    assert!(cols.contains(&col), "column {col} not in {cols:?}: {issue}");
    for n in needles {
        assert!(
            issue.message.to_lowercase().contains(&n.to_lowercase()),
            "message lacks `{n}`: {issue}"
        );
    }
    // Display: "{file}:{line}:{column}: {path}: {message}".
    assert_eq!(
        issue.to_string(),
        format!(
            "{}:{}:{}: {}: {}",
            issue.file, line, col, issue.path, issue.message
        )
    );
    issue
}

const VALID: &str = r#"version: 1
listeners:
  - name: inbound
    bind: 127.0.0.1:0
admin:
  bind: 127.0.0.1:0
upstreams:
  app:
    endpoints: ["127.0.0.1:3000"]
routes:
  - name: all
    match:
      path_prefix: /
    upstream: app
"#;

#[test]
fn a_valid_config_loads_without_warnings() {
    let loaded = load_str(VALID, FILE).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.warnings.is_empty(), "{}", show(&loaded.warnings));
}

#[test]
fn yaml_syntax_error_names_line_and_column() {
    let yaml = VALID.replace("    bind: 127.0.0.1:0\nadmin", "    bind: @oops\nadmin");
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "@oops");
    let issue = &all[0];
    assert_eq!(issue.file, FILE, "{issue}");
    assert_eq!(issue.line, Some(line), "syntax error line: {issue}");
    let c = issue.column.expect("syntax error column");
    assert!(
        c >= 5 && c <= col + 1,
        "column {c} should point at or before `@` (col {col}): {issue}"
    );
    assert!(
        issue
            .to_string()
            .starts_with(&format!("{FILE}:{line}:{c}:")),
        "{issue}"
    );
}

#[test]
fn unknown_field_suggests_the_closest_name() {
    let yaml = VALID.replace(
        "    endpoints: [\"127.0.0.1:3000\"]\n",
        "    endpoints: [\"127.0.0.1:3000\"]\n    connect_timout: 1s\n",
    );
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "connect_timout");
    expect_issue(
        &all,
        "upstreams.app",
        line,
        &[col],
        &[
            "unknown field `connect_timout`",
            "did you mean `connect_timeout`?",
        ],
    );

    // In a route, too.
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: app\n    max_request_bod: 1MiB\n",
    );
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "max_request_bod:");
    expect_issue(
        &all,
        "routes[0]",
        line,
        &[col],
        &["did you mean `max_request_body`?"],
    );

    // In a listener.
    let yaml = VALID.replace(
        "    bind: 127.0.0.1:0\nadmin",
        "    bind: 127.0.0.1:0\n    request_header_timout: 5s\nadmin",
    );
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "request_header_timout");
    expect_issue(
        &all,
        "listeners[0]",
        line,
        &[col],
        &["did you mean `request_header_timeout`?"],
    );
}

#[test]
fn wrong_type_says_what_was_expected() {
    let yaml = VALID.replace(
        "    bind: 127.0.0.1:0\nadmin",
        "    bind: 127.0.0.1:0\n    max_connections: lots\nadmin",
    );
    let all = issues(&yaml);
    let (line, key_col) = pos(&yaml, "max_connections");
    let (_, val_col) = pos(&yaml, "lots");
    expect_issue(
        &all,
        "listeners[0].max_connections",
        line,
        &[key_col, val_col],
        &["expected"],
    );

    // A mapping where a list is expected.
    let yaml = VALID.replace(
        "    endpoints: [\"127.0.0.1:3000\"]",
        "    endpoints: {a: b}",
    );
    let all = issues(&yaml);
    let (line, key_col) = pos(&yaml, "endpoints");
    let (_, val_col) = pos(&yaml, "{a: b}");
    expect_issue(
        &all,
        "upstreams.app.endpoints",
        line,
        &[key_col, val_col],
        &["expected"],
    );
}

#[test]
fn enum_value_lists_the_choices() {
    let yaml = VALID.replace(
        "    endpoints: [\"127.0.0.1:3000\"]\n",
        "    endpoints: [\"127.0.0.1:3000\"]\n    protocol: http3\n",
    );
    let all = issues(&yaml);
    let (line, key_col) = pos(&yaml, "protocol");
    let (_, val_col) = pos(&yaml, "http3");
    expect_issue(
        &all,
        "upstreams.app.protocol",
        line,
        &[key_col, val_col],
        &["http1", "http2"],
    );
}

#[test]
fn bad_duration_is_reported_with_position() {
    for bad in ["5 parsecs", "10", "-3s", "1.5.2s"] {
        let yaml = VALID.replace(
            "    endpoints: [\"127.0.0.1:3000\"]\n",
            &format!("    endpoints: [\"127.0.0.1:3000\"]\n    connect_timeout: \"{bad}\"\n"),
        );
        let all = issues(&yaml);
        let (line, key_col) = pos(&yaml, "connect_timeout");
        let (_, val_col) = pos(&yaml, &format!("\"{bad}\""));
        expect_issue(
            &all,
            "upstreams.app.connect_timeout",
            line,
            &[key_col, val_col, val_col + 1],
            &["duration"],
        );
    }
}

#[test]
fn bad_size_is_reported_with_position() {
    for bad in ["10 megs", "1XB", "-1KiB"] {
        let yaml = VALID.replace(
            "    upstream: app\n",
            &format!("    upstream: app\n    max_request_body: \"{bad}\"\n"),
        );
        let all = issues(&yaml);
        let (line, key_col) = pos(&yaml, "max_request_body");
        let (_, val_col) = pos(&yaml, &format!("\"{bad}\""));
        expect_issue(
            &all,
            "routes[0].max_request_body",
            line,
            &[key_col, val_col, val_col + 1],
            &["size"],
        );
    }
}

#[test]
fn unknown_upstream_suggests_the_closest_name() {
    let yaml = VALID.replace("    upstream: app\n", "    upstream: ap\n");
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "ap\n");
    let issue = expect_issue(
        &all,
        "routes[0].upstream",
        line,
        &[col],
        &["unknown upstream `ap`"],
    );
    assert_eq!(
        issue.to_string(),
        format!(
            "{FILE}:{line}:{col}: routes[0].upstream: unknown upstream `ap` (did you mean `app`?)"
        )
    );
}

#[test]
fn duplicate_route_names_are_rejected() {
    let yaml =
        format!("{VALID}  - name: all\n    match:\n      path_prefix: /again\n    upstream: app\n");
    let all = issues(&yaml);
    // The second `name: all`.
    let lines: Vec<usize> = yaml
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == "  - name: all")
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(lines.len(), 2);
    expect_issue(
        &all,
        "routes[1].name",
        lines[1] as u64,
        &[5, 11],
        &["duplicate", "all"],
    );
}

#[test]
fn duplicate_listener_names_are_rejected() {
    let yaml = VALID.replace("admin:", "  - name: inbound\n    bind: 127.0.0.1:0\nadmin:");
    let all = issues(&yaml);
    expect_issue(
        &all,
        "listeners[1].name",
        5,
        &[5, 11],
        &["duplicate", "inbound"],
    );
}

#[test]
fn missing_version_is_rejected() {
    let yaml = VALID.replace("version: 1\n", "");
    let all = issues(&yaml);
    let issue = all
        .iter()
        .find(|i| i.path == "version" || i.message.contains("version"))
        .unwrap_or_else(|| panic!("no version issue in:\n{}", show(&all)));
    assert_eq!(issue.file, FILE);
    assert!(
        issue.message.contains("missing") || issue.message.contains("required"),
        "says the field is missing: {issue}"
    );
}

#[test]
fn wrong_version_is_rejected() {
    let yaml = VALID.replace("version: 1\n", "version: 2\n");
    let all = issues(&yaml);
    let issue = expect_issue(&all, "version", 1, &[1, 10], &[]);
    assert!(
        issue.message.contains('1') && issue.message.contains('2'),
        "names supported and found versions: {issue}"
    );
}

#[test]
fn empty_listeners_are_rejected() {
    let yaml = VALID.replace(
        "listeners:\n  - name: inbound\n    bind: 127.0.0.1:0\n",
        "listeners: []\n",
    );
    let all = issues(&yaml);
    let (line, key_col) = pos(&yaml, "listeners: []");
    expect_issue(
        &all,
        "listeners",
        line,
        &[key_col, key_col + 11],
        &["at least one"],
    );
}

#[test]
fn bad_regex_is_reported_with_position() {
    let yaml = VALID.replace(
        "      path_prefix: /\n",
        "      path_regex: \"^/items/([0-9]+\"\n",
    );
    let all = issues(&yaml);
    let (line, key_col) = pos(&yaml, "path_regex");
    let (_, val_col) = pos(&yaml, "\"^/items");
    expect_issue(
        &all,
        "routes[0].match.path_regex",
        line,
        &[key_col, val_col, val_col + 1],
        &["regex"],
    );
}

#[test]
fn bad_bind_address_is_reported() {
    let yaml = VALID.replace(
        "    bind: 127.0.0.1:0\nadmin",
        "    bind: not-an-address\nadmin",
    );
    let all = issues(&yaml);
    let (line, key_col) = pos(&yaml, "bind: not-an-address");
    expect_issue(
        &all,
        "listeners[0].bind",
        line,
        &[key_col, key_col + 6],
        &[],
    );
}

#[test]
fn several_semantic_errors_are_reported_at_once() {
    let yaml = r#"version: 1
listeners:
  - name: inbound
    bind: 127.0.0.1:0
admin:
  bind: 127.0.0.1:0
upstreams:
  app:
    endpoints: ["127.0.0.1:3000"]
routes:
  - name: one
    match:
      path_prefix: /one
    upstream: apq
  - name: two
    match:
      path_regex: "(["
    upstream: app
  - name: one
    match:
      path_prefix: /three
    upstream: nowhere
"#;
    let all = issues(yaml);
    assert!(
        all.len() >= 4,
        "every problem is reported at once, got:\n{}",
        show(&all)
    );
    expect_issue(
        &all,
        "routes[0].upstream",
        14,
        &[15],
        &["unknown upstream `apq`", "did you mean `app`?"],
    );
    expect_issue(
        &all,
        "routes[1].match.path_regex",
        17,
        &[7, 19, 20],
        &["regex"],
    );
    expect_issue(&all, "routes[2].name", 19, &[5, 11], &["duplicate"]);
    expect_issue(
        &all,
        "routes[2].upstream",
        22,
        &[15],
        &["unknown upstream `nowhere`"],
    );
}

#[test]
fn a_shadowed_route_is_a_warning() {
    let yaml =
        format!("{VALID}  - name: never\n    match:\n      path_prefix: /api\n    upstream: app\n");
    let loaded =
        load_str(&yaml, FILE).unwrap_or_else(|e| panic!("a shadowed route is only a warning: {e}"));
    let w = loaded
        .warnings
        .iter()
        .find(|w| w.path.starts_with("routes[1]"))
        .unwrap_or_else(|| {
            panic!(
                "no warning for the shadowed route: {}",
                show(&loaded.warnings)
            )
        });
    assert_eq!(w.file, FILE);
    assert!(w.line.is_some(), "{w}");
    assert!(
        w.message.contains("shadow") || w.message.contains("never match"),
        "{w}"
    );
    assert!(w.message.contains("all"), "names the shadowing route: {w}");
}

fn loads(yaml: &str) -> spillway::config::Loaded {
    load_str(yaml, FILE).unwrap_or_else(|e| panic!("config should load:\n{e}\n---\n{yaml}"))
}

#[test]
fn an_unset_max_wait_follows_a_shorter_deadline() {
    // Only `timeouts.request` is written: the default max_wait (1s) must not
    // contradict it.
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: app\n    timeouts:\n      request: 500ms\n",
    );
    let loaded = loads(&yaml);
    assert!(loaded.warnings.is_empty(), "{}", show(&loaded.warnings));
    let route = &loaded.config.routes[0];
    assert_eq!(route.queue.max_wait.0, Duration::from_millis(500));
    assert_eq!(route.timeouts.request.0, Duration::from_millis(500));

    // A deadline from `defaults:` is written by the user too.
    let yaml = format!("{VALID}defaults:\n  timeouts: {{request: 300ms}}\n");
    let loaded = loads(&yaml);
    assert!(loaded.warnings.is_empty(), "{}", show(&loaded.warnings));
    assert_eq!(
        loaded.config.routes[0].queue.max_wait.0,
        Duration::from_millis(300)
    );

    // A longer deadline keeps the 1s default.
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: app\n    timeouts: {request: 3s}\n",
    );
    assert_eq!(
        loads(&yaml).config.routes[0].queue.max_wait.0,
        Duration::from_secs(1)
    );

    // Likewise an unset backoff.max follows a longer backoff.base.
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: app\n    retries: {max_attempts: 2, backoff: {base: 2s}}\n",
    );
    let loaded = loads(&yaml);
    let backoff = &loaded.config.routes[0].retries.backoff;
    assert_eq!(backoff.base.0, Duration::from_secs(2));
    assert_eq!(backoff.max.0, Duration::from_secs(2));
}

#[test]
fn only_written_values_contradict_each_other() {
    // Both written in the route: an error at max_wait naming both.
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: app\n    queue: {max_wait: 2s}\n    timeouts: {request: 1s}\n",
    );
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "2s}");
    let issue = expect_issue(&all, "routes[0].queue.max_wait", line, &[col], &[]);
    assert_eq!(issue.path, "routes[0].queue.max_wait");
    assert_eq!(
        issue.message,
        "queue.max_wait (2s) must be less than timeouts.request (1s)"
    );

    // The deadline inherited from `defaults:`: still written by the user; the
    // message says where each value is written.
    let yaml = format!(
        "{}defaults:\n  timeouts: {{request: 1s}}\n",
        VALID.replace(
            "    upstream: app\n",
            "    upstream: app\n    queue: {max_wait: 2s}\n",
        )
    );
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "2s}");
    let issue = expect_issue(&all, "routes[0].queue.max_wait", line, &[col], &[]);
    assert_eq!(
        issue.message,
        "queue.max_wait (2s) must be less than defaults.timeouts.request (1s)"
    );

    // per_try against a written deadline.
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: app\n    timeouts: {request: 1s, per_try: 3s}\n",
    );
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "3s}");
    let issue = expect_issue(&all, "routes[0].timeouts.per_try", line, &[col], &[]);
    assert_eq!(
        issue.message,
        "timeouts.per_try (3s) must not exceed timeouts.request (1s)"
    );

    // Against the default deadline (15s) a written value is not an error:
    // the deadline bounds it anyway, and a warning says so.
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: app\n    queue: {max_wait: 20s}\n",
    );
    let loaded = loads(&yaml);
    let w = loaded
        .warnings
        .iter()
        .find(|w| w.path == "routes[0].queue.max_wait")
        .unwrap_or_else(|| panic!("no warning: {}", show(&loaded.warnings)));
    assert!(w.message.contains("the default"), "{w}");
    assert_eq!(
        loaded.config.routes[0].queue.max_wait.0,
        Duration::from_secs(20)
    );
}

#[test]
fn an_unknown_field_is_reported_under_the_mapping_that_holds_it() {
    // After a sibling whose value is a mapping: the path is the route, not
    // the sibling's last key.
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: app\n    queue: {max_wait: 1s}\n    modez: fast\n",
    );
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "modez");
    let issue = expect_issue(&all, "routes[0]", line, &[col], &["unknown field `modez`"]);
    assert_eq!(issue.path, "routes[0]", "{issue}");

    // After a nested block, and inside one.
    let yaml = VALID.replace(
        "    endpoints: [\"127.0.0.1:3000\"]\n",
        "    endpoints: [\"127.0.0.1:3000\"]\n    circuit_breaker:\n      half_open_calls: 3\n    retry_budget: 5\n",
    );
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "retry_budget");
    let issue = expect_issue(&all, "upstreams.app", line, &[col], &["`retry_budget`"]);
    assert_eq!(issue.path, "upstreams.app", "{issue}");

    let yaml = VALID.replace(
        "    endpoints: [\"127.0.0.1:3000\"]\n",
        "    endpoints: [\"127.0.0.1:3000\"]\n    circuit_breaker:\n      half_open_calls: 3\n      half_open_probes: 2\n",
    );
    let all = issues(&yaml);
    let (line, col) = pos(&yaml, "half_open_probes");
    let issue = expect_issue(
        &all,
        "upstreams.app.circuit_breaker",
        line,
        &[col],
        &["`half_open_probes`"],
    );
    assert_eq!(issue.path, "upstreams.app.circuit_breaker", "{issue}");
}

#[test]
fn every_problem_is_reported_even_after_a_parse_error() {
    // Unknown fields (block and flow style, several), a bad value, an
    // unknown upstream and a timing contradiction, in one file.
    let yaml = r#"version: 1
listeners:
  - name: inbound
    bind: 127.0.0.1:0
    idle_timout: 5s
upstreams:
  app:
    endpoints: ["127.0.0.1:3000"]
    connect_timeout: soon
routes:
  - name: one
    match: {path_prefix: /one, methodz: [GET]}
    upstream: apq
    queue:
      max_wait: 2s
    timeouts: {request: 1s}
    modez: fast
  - name: two
    upstream: app
    retries:
      max_attempts: 2
      budgett:
        ratio: 0.1
"#;
    let all = issues(yaml);
    let expected: [(&str, &str, &str); 7] = [
        (
            "listeners[0]",
            "idle_timout",
            "did you mean `idle_timeout`?",
        ),
        ("upstreams.app.connect_timeout", "soon", "duration"),
        ("routes[0].match", "methodz", "did you mean `methods`?"),
        ("routes[0].upstream", "apq", "unknown upstream `apq`"),
        (
            "routes[0].queue.max_wait",
            "2s",
            "must be less than timeouts.request (1s)",
        ),
        ("routes[0]", "modez", "unknown field `modez`"),
        ("routes[1].retries", "budgett", "did you mean `budget`?"),
    ];
    assert_eq!(all.len(), expected.len(), "{}", show(&all));
    for ((path, needle, message), issue) in expected.iter().zip(&all) {
        let (line, col) = pos(yaml, needle);
        assert_eq!(issue.path, *path, "in file order:\n{}", show(&all));
        assert_eq!(
            (issue.line, issue.column),
            (Some(line), Some(col)),
            "{issue}"
        );
        assert!(issue.message.contains(message), "{issue}");
    }

    // A required field with a bad value is not reported missing as well.
    let yaml = VALID.replace("    upstream: app\n", "    upstream: [app]\n");
    let all = issues(&yaml);
    assert_eq!(all.len(), 1, "{}", show(&all));
    assert_eq!(all[0].path, "routes[0].upstream", "{}", show(&all));
}

// ---------------------------------------------------------------------------
// spillway check
// ---------------------------------------------------------------------------

fn spillway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(args)
        .env_remove("SPILLWAY_CONFIG")
        .env("SPILLWAY_LOG", "warn")
        .output()
        .expect("run spillway")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn check_accepts_a_valid_file_with_a_one_line_summary() {
    let dir = TempDir::new("check-ok");
    let path = dir.write("ok.yaml", VALID);
    let out = spillway(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one-line summary, got:\n{stdout}");
}

#[test]
fn check_rejects_an_invalid_file_printing_every_issue() {
    let dir = TempDir::new("check-bad");
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: ap\n    max_request_bod: 1MiB\n",
    );
    let path = dir.write("bad.yaml", &yaml);
    let out = spillway(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("bad.yaml:15:5"),
        "file:line:column of the unknown field:\n{all}"
    );
    assert!(all.contains("did you mean `max_request_body`?"), "{all}");

    let yaml = VALID.replace("    upstream: app\n", "    upstream: ap\n");
    let path = dir.write("bad2.yaml", &yaml);
    let out = spillway(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("bad2.yaml:14:15"), "{all}");
    assert!(all.contains("routes[0].upstream"), "{all}");
    assert!(all.contains("did you mean `app`?"), "{all}");
}

#[test]
fn check_reports_invalid_utf8_at_its_line_and_column() {
    let dir = TempDir::new("check-utf8");
    let path = dir.path().join("latin1.yaml");
    let mut bytes = VALID.replace("name: all", "name: caf#").into_bytes();
    let at = bytes.iter().position(|b| *b == b'#').expect("marker");
    bytes[at] = 0xe9; // `é` in Latin-1: not UTF-8
    std::fs::write(&path, &bytes).expect("write");
    let out = spillway(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    let (line, col) = pos(VALID, "all\n");
    let col = col + 3;
    assert!(
        all.contains(&format!("latin1.yaml:{line}:{col}: ")),
        "file:line:column of the bad byte:\n{all}"
    );
    assert!(all.contains("UTF-8"), "{all}");
    assert!(!all.contains("index"), "no byte index:\n{all}");
}

#[test]
fn check_prints_every_problem_in_one_run() {
    let dir = TempDir::new("check-all");
    let yaml = VALID.replace(
        "    upstream: app\n",
        "    upstream: ap\n    max_request_bod: 1MiB\n    queue: {max_wait: 2s}\n    timeouts: {request: 1s}\n",
    );
    let path = dir.write("bad.yaml", &yaml);
    let out = spillway(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    let want = [
        "bad.yaml:14:15: routes[0].upstream: unknown upstream `ap` (did you mean `app`?)",
        "bad.yaml:15:5: routes[0]: unknown field `max_request_bod` (did you mean `max_request_body`?)",
        "bad.yaml:16:23: routes[0].queue.max_wait: queue.max_wait (2s) must be less than timeouts.request (1s)",
    ];
    let mut last = 0;
    for w in want {
        let at = all
            .find(w)
            .unwrap_or_else(|| panic!("missing `{w}` in:\n{all}"));
        assert!(at >= last, "sorted by line:\n{all}");
        last = at;
    }
}

#[test]
fn check_of_a_missing_file_is_a_config_error() {
    let dir = TempDir::new("check-missing");
    let path = dir.path().join("does-not-exist.yaml");
    let out = spillway(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("does-not-exist.yaml"),
        "names the file: {}",
        text(&out)
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["check", "--no-such-flag"][..],
        &["frobnicate"][..],
        &["check", "--config"][..],
    ] {
        let out = spillway(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
}

#[test]
fn version_flag_prints_the_version() {
    let out = spillway(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        text(&out)
    );
}

// === priority, fairness and shadow mode ===

fn with_route_lines(lines: &str) -> String {
    format!("{VALID}{lines}")
}

#[test]
fn priority_fairness_and_mode_validate_every_rule() {
    let yaml = with_route_lines(
        "    priority:\n      classes: [critical, default, critical]\n      default: normal\n      reserved: { gold: 20%, default: 150% }\n    fairness:\n      key: { header: x-tenant-id, client_ip: true }\n    mode: dry_run\n",
    );
    let all = issues(&yaml);
    // Each issue points at the value it is about (or its key).
    let at = |path: &str, value: &str, key: &str, needles: &[&str]| {
        let (line, col) = pos(&yaml, value);
        let (kline, kcol) = pos(&yaml, key);
        let issue = all
            .iter()
            .find(|i| i.path == path)
            .unwrap_or_else(|| panic!("no issue for `{path}` in:\n{}", show(&all)));
        let here = (issue.line, issue.column);
        assert!(
            here == (Some(line), Some(col)) || here == (Some(kline), Some(kcol)),
            "{issue} not at {line}:{col} or {kline}:{kcol}"
        );
        for n in needles {
            assert!(issue.message.contains(n), "{issue} lacks `{n}`");
        }
    };
    at(
        "routes[0].priority.classes[2]",
        "critical]",
        "classes:",
        &["duplicate class"],
    );
    at(
        "routes[0].priority.default",
        "normal",
        "default: normal",
        &["`normal` is not one of the classes"],
    );
    at(
        "routes[0].priority.reserved.gold",
        "20%",
        "gold:",
        &["not one of the classes"],
    );
    at(
        "routes[0].priority.reserved.default",
        "150%",
        "default: 150%",
        &["share like"],
    );
    at(
        "routes[0].fairness.key",
        "{ header",
        "key:",
        &["exactly one key source"],
    );
    at("routes[0].mode", "dry_run", "mode:", &["enforce", "shadow"]);
}

#[test]
fn reserved_shares_must_leave_room_and_classes_are_two_to_eight() {
    let yaml = with_route_lines(
        "    priority:\n      classes: [a, b, c]\n      default: c\n      reserved: { a: 60%, b: 40% }\n",
    );
    let all = issues(&yaml);
    assert!(
        all.iter()
            .any(|i| i.path == "routes[0].priority.reserved" && i.message.contains("100%")),
        "{}",
        show(&all)
    );
    let yaml = with_route_lines("    priority:\n      classes: [only]\n      default: only\n");
    let all = issues(&yaml);
    assert!(
        all.iter()
            .any(|i| i.path == "routes[0].priority.classes" && i.message.contains("2 to 8")),
        "{}",
        show(&all)
    );
}

#[test]
fn client_identity_fairness_needs_a_listener_with_client_ca() {
    let yaml = with_route_lines("    fairness:\n      key: { client_identity: true }\n");
    let all = issues(&yaml);
    assert!(
        all.iter()
            .any(|i| i.path == "routes[0].fairness.key.client_identity"
                && i.message.contains("client_ca")),
        "{}",
        show(&all)
    );
}

#[test]
fn overload_control_fields_load_with_their_defaults() {
    let yaml = with_route_lines(
        "    priority:\n      classes: [critical, default, sheddable]\n      reserved: { critical: 20% }\n    fairness:\n      key: { client_ip: true }\n    mode: shadow\n",
    );
    let loaded = load_str(&yaml, FILE).expect("valid");
    let r = &loaded.config.routes[0];
    let p = r.priority.as_ref().expect("priority");
    assert_eq!(p.header.as_str(), "x-spillway-priority");
    assert_eq!(p.default, 1, "a class named `default` is the default");
    assert_eq!(p.reserved, vec![0.2, 0.0, 0.0]);
    assert_eq!(r.fairness.as_ref().map(|f| f.max_keys), Some(1024));
    assert_eq!(r.mode, spillway::config::Mode::Shadow);
}
