//! `concurrency.max_in_flight: auto`: its validation, and the adaptive limit
//! in front of a service of fixed capacity, through real sockets.

mod support;

use spillway::config::{load_str, ConfigIssue};

const FILE: &str = "t.yaml";

fn yaml(concurrency: &str) -> String {
    format!(
        "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nupstreams:\n  app:\n    endpoints: [\"127.0.0.1:3000\"]\nroutes:\n  - name: api\n    upstream: app\n    concurrency:\n{concurrency}"
    )
}

fn issues(text: &str) -> Vec<ConfigIssue> {
    match load_str(text, FILE) {
        Ok(_) => panic!("config should be rejected:\n{text}"),
        Err(e) => e.issues,
    }
}

/// The issue at `path`, with a line, whose message contains `needle`.
fn expect(all: &[ConfigIssue], path: &str, needle: &str) {
    let issue = all
        .iter()
        .find(|i| i.path == path)
        .unwrap_or_else(|| panic!("no issue for `{path}` in {all:#?}"));
    assert!(issue.line.is_some(), "no line: {issue}");
    assert!(
        issue.message.contains(needle),
        "message lacks `{needle}`: {issue}"
    );
}

#[test]
fn auto_with_defaults_is_valid_and_shown_as_auto() {
    let loaded = load_str(&yaml("      max_in_flight: auto\n"), FILE).expect("valid");
    let c = &loaded.config.routes[0].concurrency;
    let a = c.adaptive.expect("adaptive");
    assert_eq!((a.min, a.max, a.initial, a.tolerance), (1, 1024, 16, 2.0));
    assert_eq!(c.max_in_flight, 16);
    let json = loaded.config.to_json();
    let shown = &json["routes"][0]["concurrency"];
    assert_eq!(shown["max_in_flight"], "auto", "{shown}");
    assert_eq!(shown["adaptive"]["initial"], 16, "{shown}");

    let loaded = load_str(
        &yaml("      max_in_flight: auto\n      adaptive:\n        min: 2\n        max: 8\n        tolerance: 1.5\n"),
        FILE,
    )
    .expect("valid");
    let a = loaded.config.routes[0]
        .concurrency
        .adaptive
        .expect("adaptive");
    // `initial` defaults to 16 clamped into [min, max].
    assert_eq!((a.min, a.max, a.initial, a.tolerance), (2, 8, 8, 1.5));

    let loaded = load_str(&yaml("      max_in_flight: 12\n"), FILE).expect("valid");
    let c = &loaded.config.routes[0].concurrency;
    assert_eq!((c.max_in_flight, c.adaptive), (12, None));
    assert_eq!(
        loaded.config.to_json()["routes"][0]["concurrency"]["max_in_flight"],
        12
    );
}

#[test]
fn adaptive_needs_auto() {
    let all = issues(&yaml(
        "      max_in_flight: 8\n      adaptive:\n        min: 2\n",
    ));
    expect(
        &all,
        "routes[0].concurrency.adaptive",
        "only with `max_in_flight: auto`",
    );
    let all = issues(&yaml("      adaptive:\n        min: 2\n"));
    expect(
        &all,
        "routes[0].concurrency.adaptive",
        "only with `max_in_flight: auto`",
    );
}

#[test]
fn max_in_flight_is_a_number_or_auto() {
    let all = issues(&yaml("      max_in_flight: automatic\n"));
    expect(
        &all,
        "routes[0].concurrency.max_in_flight",
        "expected a number or `auto`",
    );
    let all = issues(&yaml("      max_in_flight: 0\n"));
    expect(&all, "routes[0].concurrency.max_in_flight", "at least 1");
}

#[test]
fn adaptive_bounds_are_ordered_and_tolerance_above_one() {
    let all = issues(&yaml(
        "      max_in_flight: auto\n      adaptive:\n        min: 10\n        max: 4\n        tolerance: 1.0\n",
    ));
    expect(
        &all,
        "routes[0].concurrency.adaptive.min",
        "must not exceed max",
    );
    expect(
        &all,
        "routes[0].concurrency.adaptive.tolerance",
        "greater than 1",
    );
    let all = issues(&yaml(
        "      max_in_flight: auto\n      adaptive:\n        min: 4\n        max: 64\n        initial: 2\n",
    ));
    expect(
        &all,
        "routes[0].concurrency.adaptive.initial",
        "between min (4) and max (64)",
    );
    let all = issues(&yaml(
        "      max_in_flight: auto\n      adaptive:\n        min: 0\n",
    ));
    expect(&all, "routes[0].concurrency.adaptive.min", "at least 1");
    let all = issues(&yaml(
        "      max_in_flight: auto\n      adaptive:\n        minimum: 3\n",
    ));
    assert!(
        all.iter().any(|i| i.message.contains("minimum")),
        "unknown field reported: {all:#?}"
    );
}

#[test]
fn adaptive_in_defaults_serves_routes_that_say_auto() {
    let text = "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nupstreams:\n  app:\n    endpoints: [\"127.0.0.1:3000\"]\ndefaults:\n  concurrency:\n    adaptive:\n      max: 64\nroutes:\n  - name: fixed\n    match:\n      path_prefix: /a\n    upstream: app\n    concurrency:\n      max_in_flight: 8\n  - name: auto\n    upstream: app\n    concurrency:\n      max_in_flight: auto\n";
    let loaded = load_str(text, FILE).expect("valid");
    assert_eq!(loaded.config.routes[0].concurrency.adaptive, None);
    let a = loaded.config.routes[1]
        .concurrency
        .adaptive
        .expect("adaptive");
    assert_eq!(a.max, 64);
}
