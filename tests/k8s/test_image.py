"""The Dockerfile, checked without building it (CI has no Docker engine):
its shape, what it copies, and that the chart runs it the way it is built."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import helm_python as helm

from test_chart import CHART, ROOT, pod_spec, render, spillway_bin

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_multi_stage_build_and_small_runtime() -> None:
    froms = [args for word, args in instructions() if word == "FROM"]
    assert len(froms) == 2, froms
    assert re.fullmatch(r"rust:\$\{RUST_VERSION\}-bookworm AS build", froms[0]), froms[0]
    assert re.search(r"^ARG RUST_VERSION=1$", DOCKERFILE, re.M)
    assert froms[1].startswith("gcr.io/distroless/cc-debian12"), froms[1]
    runs = " ".join(" ".join(args for word, args in instructions() if word == "RUN").split())
    # The image ships the fat-LTO `dist` profile, profile-guided by default
    # (the build the core benchmarks measure); PGO=0 builds it plainly.
    assert re.search(r"^ARG PGO=1$", DOCKERFILE, re.M)
    assert 'if [ "$PGO" = 1 ]; then bash scripts/pgo-build.sh && bin=target/pgo/spillway;' in runs
    assert "cargo build --profile dist --locked --bin spillway && bin=target/dist/spillway;" in runs
    # The script builds the `dist` profile unless told otherwise.
    assert 'PROFILE="${PROFILE:-dist}"' in (ROOT / "scripts" / "pgo-build.sh").read_text()


def test_non_root_numeric_user_matches_the_chart() -> None:
    users = [args for word, args in instructions() if word == "USER"]
    assert users == ["65532:65532"], users
    with helm.Chart.load(str(CHART)) as c:
        values = c.values
    assert values["workload"]["podSecurityContext"]["runAsUser"] == 65532
    assert values["workload"]["podSecurityContext"]["runAsGroup"] == 65532
    assert values["proxy"]["securityContext"]["runAsUser"] == 65532


def test_runtime_gets_the_binary_and_default_config_only() -> None:
    copies = [args for word, args in instructions() if word == "COPY"]
    # Build context into the builder; one directory from it into the runtime.
    assert copies == [". .", "--from=build /out/ /"], copies
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    installs = re.findall(r"install -D -m \d+ (\S+) /out(\S+)", runs)
    assert installs == [('"$bin"', "/usr/local/bin/spillway"),
                        ("config/spillway.yaml", "/etc/spillway/spillway.yaml")], installs
    env = [args for word, args in instructions() if word == "ENV"]
    assert env == ["SPILLWAY_CONFIG=/etc/spillway/spillway.yaml"]
    assert ("ENTRYPOINT", '["/usr/local/bin/spillway"]') in instructions()


def test_build_context_keeps_what_cargo_needs() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    needed = ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs", "config/spillway.yaml",
              "config/demo.yaml", "benches", "tests"]
    for path in needed:
        assert (ROOT / path).exists(), path
        for pattern in ignored:
            assert not fnmatch.fnmatch(path, pattern) and not path.startswith(pattern.rstrip("/") + "/") \
                and path != pattern, f".dockerignore `{pattern}` would drop {path}"
    assert "target" in ignored and ".git" in ignored


def test_default_config_in_the_image_is_valid(tmp_path: Path) -> None:
    r = subprocess.run([str(spillway_bin()), "check", "--config", str(ROOT / "config" / "spillway.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_chart_args_suit_the_entrypoint() -> None:
    """The chart passes arguments only: the image's ENTRYPOINT is the binary."""
    spec = pod_spec(render())
    for c in spec["initContainers"] + spec["containers"]:
        assert "command" not in c, c["name"]
    sw = spec["initContainers"][0]
    assert sw["args"][:4] == ["--log-format", "json", "--log", "info"]
    assert sw["args"][4:] == ["run", "--config", "/etc/spillway/spillway.yaml"]
    r = subprocess.run([str(spillway_bin()), *sw["args"][:4], "run", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, "the binary accepts the chart's global flags: " + r.stderr


def test_demo_app_args_are_accepted() -> None:
    """The default app container runs the image's own simulated upstream."""
    app = pod_spec(render())["containers"][0]
    r = subprocess.run([str(spillway_bin()), *app["args"], "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
