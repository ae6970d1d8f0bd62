//! The fuzz targets' bounded pass, on stable and without cargo-fuzz: every
//! seed in `fuzz/corpus/<target>/` through its entry point in
//! `spillway::fuzz_api`, then a fixed number of inputs mutated from those
//! seeds by a small deterministic mutator (bit flips, interesting bytes,
//! truncation, insertion, deletion, duplication, splicing). The same seed
//! gives the same inputs on every run, so a failure here reproduces.
//!
//! Inputs that once crashed a target are kept in its corpus and named in a
//! regression test below. Longer, coverage-guided runs: `scripts/fuzz.sh`.

use std::path::{Path, PathBuf};

use spillway::fuzz_api;

/// Mutated inputs per target; `FUZZ_MUTATIONS` sets another count (a longer
/// pass on stable: `FUZZ_MUTATIONS=200000 cargo test --release --test
/// fuzz_corpus`).
const MUTATIONS: usize = 2_000;

fn mutations() -> usize {
    std::env::var("FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MUTATIONS)
}
/// Longest mutated input (the fuzz script's default `-max_len` is larger;
/// this keeps the pass quick in debug builds).
const MAX_LEN: usize = 8 * 1024;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The seeds of `target`, sorted by name so the run is deterministic.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read seed"))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{} has no seeds", dir.display());
    out
}

/// xorshift64*: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bytes that matter to the parsers under test.
const INTERESTING: &[u8] = b"\0\r\n\t :;,=\"\\-0179afAFHMSmun\x7f\x80\xff";

fn mutate(rng: &mut Rng, seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            // Flip a bit.
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            // Overwrite with an interesting or a random byte.
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = if rng.below(2) == 0 {
                    INTERESTING[rng.below(INTERESTING.len())]
                } else {
                    rng.next() as u8
                };
            }
            // Truncate.
            2 if len > 0 => v.truncate(rng.below(len)),
            // Insert a few bytes.
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n)
                    .map(|_| INTERESTING[rng.below(INTERESTING.len())])
                    .collect();
                v.splice(i..i, bytes);
            }
            // Delete a range.
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            // Duplicate a range in place.
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let copy = v[i..i + n].to_vec();
                v.splice(i..i, copy);
            }
            // Splice: this input's head, another seed's tail.
            6 => {
                let other = &seeds[rng.below(seeds.len())].1;
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            // Replace a digit run's digit with a large one (lengths, sizes).
            _ => {
                if let Some(i) = v.iter().position(|b| b.is_ascii_digit()) {
                    v.splice(i..i, b"999999999999".iter().copied());
                }
            }
        }
        v.truncate(MAX_LEN);
    }
    v
}

/// Every seed of `target`, then [`mutations`] mutated inputs, through `f`.
fn pass(target: &str, seed: u64, f: fn(&[u8])) {
    let seeds = seeds(target);
    for (name, data) in &seeds {
        let r = std::panic::catch_unwind(|| f(data));
        assert!(r.is_ok(), "{target}: seed {name} failed");
    }
    let mut rng = Rng(seed);
    for i in 0..mutations() {
        let input = mutate(&mut rng, &seeds);
        let r = std::panic::catch_unwind(|| f(&input));
        assert!(
            r.is_ok(),
            "{target}: mutated input #{i} failed; save it with \
             `fuzz/corpus/{target}/` and reproduce with \
             `cargo +nightly fuzz run {target} <file>`: {input:?}"
        );
    }
}

#[test]
fn h1_response_corpus_and_mutations() {
    pass("h1_response", 0x5eed_0001, fuzz_api::h1_response);
}

#[test]
fn request_head_corpus_and_mutations() {
    pass("request_head", 0x5eed_0002, fuzz_api::request_head);
}

#[test]
fn server_head_corpus_and_mutations() {
    pass("server_head", 0x5eed_0006, fuzz_api::server_head);
}

#[test]
fn config_corpus_and_mutations() {
    pass("config", 0x5eed_0003, fuzz_api::config);
}

#[test]
fn grpc_timeout_corpus_and_mutations() {
    pass("grpc_timeout", 0x5eed_0004, fuzz_api::grpc_timeout);
}

#[test]
fn certificate_corpus_and_mutations() {
    pass("certificate", 0x5eed_0005, fuzz_api::certificate);
}

#[test]
fn empty_and_tiny_inputs() {
    for f in [
        fuzz_api::h1_response,
        fuzz_api::request_head,
        fuzz_api::server_head,
        fuzz_api::config,
        fuzz_api::grpc_timeout,
        fuzz_api::certificate,
    ] {
        for input in [&b""[..], b"\0", b"\xff", b"\r\n", b"\r\n\r\n"] {
            f(input);
        }
    }
}

// === regressions: inputs the fuzzers found ===

/// Reads one corpus file (kept there so the fuzzers start from it too).
fn found(target: &str, name: &str) -> Vec<u8> {
    let p = corpus_dir(target).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A second `Connection` header (here after `Connection: Upgrade`) named a
/// header that was forwarded upstream: only the first was read.
#[test]
fn regression_request_head_second_connection_header() {
    fuzz_api::request_head(&found(
        "request_head",
        "regression-second-connection-header",
    ));
}

/// A `Connection` value with one non-UTF-8 token hid every name in it.
#[test]
fn regression_request_head_connection_not_utf8() {
    fuzz_api::request_head(&found("request_head", "regression-connection-not-utf8"));
}
