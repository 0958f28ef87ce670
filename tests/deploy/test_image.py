"""The production image: Dockerfile, .dockerignore, constraints, and a real build and run.

The static checks always run. The build runs where a container engine (docker with a
daemon, or podman) and the base image are both available; no registry is reachable
from every machine, so the base image must already be in the engine's store, and the
test skips saying which of the two is missing. MOE_ROUTER_IMAGE_BASE names another
base (a mirror's copy) and MOE_ROUTER_IMAGE_TORCH_INDEX another torch index for that
build; both are test knobs only (the Makefile has BASE_IMAGE and TORCH_INDEX).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from server_process import clean_env, small_routers

from moe_router.doors.healthcheck import check_health

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = REPO / "deploy" / "image" / "constraints.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BENCH_PACKAGES = {"matplotlib", "tqdm"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _image_requirements() -> list[Requirement]:
    """What the image needs: the client's dependencies and the server extra."""
    project = _pyproject()["project"]
    return [Requirement(r) for r in project["dependencies"]
            + project["optional-dependencies"]["server"]]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _public(version: str) -> Version:
    return Version(Version(version).public)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


# -------------------------------------------------------------------- dependencies
def test_every_requirement_of_the_image_is_pinned_within_its_range():
    pins = _pins()
    for requirement in _image_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name]), (requirement, pins[name])


def test_the_pins_are_closed_under_dependencies():
    """Each pinned package's own requirements are pinned too, and satisfied.

    Read from the installed metadata wherever the test environment has the pinned
    version (torch's local label aside); markers are judged for this platform.
    """
    pins = _pins()
    checked = 0
    for name, pinned in pins.items():
        try:
            installed = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if _public(installed.version) != pinned:
            continue
        checked += 1
        for text in installed.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(requirement.name)
            assert dep in pins, f"{name}=={pinned} needs {requirement}, not in {CONSTRAINTS.name}"
            assert requirement.specifier.contains(pins[dep], prereleases=True), (name, text)
    assert checked >= len(pins) // 2, "too few pins match the test environment to judge"


def test_bench_packages_stay_out_of_the_image():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {canonicalize_name(Requirement(r).name) for r in extras["bench"]} == BENCH_PACKAGES
    assert not BENCH_PACKAGES & {canonicalize_name(r.name) for r in _image_requirements()}
    assert not BENCH_PACKAGES & set(_pins())
    assert "bench" in (REPO / "Makefile").read_text().split("-e '.[")[1].split("]")[0]


def test_the_server_and_the_cli_run_without_the_bench_packages(tmp_path):
    """matplotlib and tqdm made unimportable: serving modules load, `simulate` runs."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {sorted(BENCH_PACKAGES)!r}:
            raise ImportError(f'{{name}} is not installed')
sys.meta_path.insert(0, Block())
import moe_router.doors.server, moe_router.analysis, moe_router.doors.healthcheck
from moe_router.cli import main
sys.exit(main(['simulate', '--experts', '8', '--tokens', '64', '--top-k', '2',
               '--devices', '2']))
"""
    env = clean_env(PYTHONPATH=f"{REPO / 'server'}:{REPO / 'client'}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[1].startswith("load balance"), done.stdout


# ---------------------------------------------------------------- Dockerfile, context
def test_the_dockerfile_pins_its_base_and_installs_dependencies_before_the_source():
    steps = _dockerfile_instructions()
    base = next(rest for word, rest in steps if word == "ARG" and rest.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?",
                        base), base
    stages = [rest for word, rest in steps if word == "FROM"]
    assert [s.split(" AS ")[1] for s in stages] == ["deps", "wheel", "ops", "runtime"]
    deps = steps[steps.index(("FROM", stages[0])):steps.index(("FROM", stages[1]))]
    assert [rest for word, rest in deps if word == "COPY"] == [
        "deploy/image/constraints.txt /tmp/constraints.txt"]  # never the source
    assert any("-r /tmp/constraints.txt" in rest for word, rest in deps if word == "RUN")
    assert any("--index-url \"${TORCH_INDEX}\"" in rest for word, rest in deps)
    assert f"TORCH_INDEX={CPU_INDEX}" in [rest for word, rest in deps if word == "ARG"]


def test_the_runtime_stage_is_non_root_with_a_grpc_healthcheck():
    steps = _dockerfile_instructions()
    runtime = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]
    words = dict(runtime)
    assert words["USER"] == "10001:10001"
    assert '"moe_router.doors.healthcheck"' in words["HEALTHCHECK"]
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert set(words["EXPOSE"].split()) == {"50051", "9090", "8080"}
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert all(c.startswith("--from=") for c in copies), copies  # no build context here
    # From the ops stage only the compiled ops, where the server's loader looks for them.
    assert [c for c in copies if c.startswith("--from=ops")] == [
        "--from=ops /opt/moe-router-ops /opt/moe-router-ops"]
    assert "TORCH_EXTENSIONS_DIR=/opt/moe-router-ops" in words["ENV"]
    # Kubernetes runs it as the same user (deploy/base/deployment.yaml).
    deployment = yaml.safe_load((REPO / "deploy" / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (10001, 10001)


def test_the_build_context_holds_only_what_the_image_needs():
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines[0] == "*"  # everything out (.venv, .git, tests, results), then these in
    allowed = [x[1:].rstrip("/") for x in lines if x.startswith("!")]
    for path in allowed:
        assert (REPO / path).exists(), path
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from="):
            source = rest.split()[0]
            assert any(source == a or source.startswith(a + "/") for a in allowed), source
    assert not {".venv", ".git", "tests", "benchmark_results"} & set(allowed)


def test_the_makefile_makes_the_torch_build_explicit():
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_INDEX ?= {CPU_INDEX}" in makefile
    assert "--index-url $(TORCH_INDEX) $(TORCH_SPEC)" in makefile
    assert "--build-arg TORCH_INDEX=$(TORCH_INDEX)" in makefile
    done = subprocess.run(["make", "-n", "image", "CONTAINER_ENGINE=podman",
                           "TORCH_INDEX=https://download.pytorch.org/whl/cu128"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "podman build --format docker" in done.stdout
    assert "-t moe-router:0.1.0-cu128 ." in done.stdout


# ------------------------------------------------------------------- build and run
def _engine() -> str | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return "docker"
    return "podman" if shutil.which("podman") else None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_image_builds_serves_route_and_health_and_stops_cleanly_on_sigterm(tmp_path):
    engine = _engine()
    if engine is None:
        pytest.skip("no container engine: docker has no daemon here and podman is absent")
    base = os.environ.get("MOE_ROUTER_IMAGE_BASE") or next(
        rest.split("=", 1)[1] for word, rest in _dockerfile_instructions()
        if word == "ARG" and rest.startswith("BASE_IMAGE="))
    found = subprocess.run([engine, "image", "inspect", base], capture_output=True, timeout=60)
    if found.returncode != 0:
        pytest.skip(f"the base image {base} is not in {engine}'s store and no registry is "
                    "reachable from here to pull it")
    torch_index = os.environ.get("MOE_ROUTER_IMAGE_TORCH_INDEX", CPU_INDEX)
    tag = "moe-router:test-build"
    build = [engine, "build", "--build-arg", f"BASE_IMAGE={base}",
             "--build-arg", f"TORCH_INDEX={torch_index}", "-t", tag, str(REPO)]
    if engine == "podman":
        build[2:2] = ["--format", "docker"]  # podman drops HEALTHCHECK from OCI images
    if "MOE_ROUTER_IMAGE_TORCH_INDEX" in os.environ:
        build[2:2] = ["--network", "host"]  # a mirror on this host's loopback
    done = subprocess.run(build, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "0.0.0.0", "port": 50051, "device": "cpu", "drain_grace_s": 5.0},
        "metrics": {"host": "0.0.0.0", "port": 9090},
        "health": {"host": "0.0.0.0", "port": 8080},
        "routers": small_routers()[:1],
    }))
    config.chmod(0o644)
    run = subprocess.run(
        [engine, "run", "-d", "--read-only", "--tmpfs", "/tmp", "-p", "127.0.0.1::50051",
         "-v", f"{config}:/etc/moe-router/config.yaml:ro", tag],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    container = run.stdout.strip()
    try:
        port = subprocess.run([engine, "port", container, "50051/tcp"], capture_output=True,
                              text=True, timeout=60).stdout.strip().rsplit(":", 1)[1]
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not check_health(target, timeout_s=2.0).healthy:
            assert time.monotonic() < deadline, _logs(engine, container)
            time.sleep(1)
        from moe_router_client import RouterClient

        with RouterClient(target, timeout=30.0) as client:
            result = client.route("mixtral", np.ones((4, 64), dtype=np.float32))
        assert result.expert_indices.shape == (4, 2)
        inside = subprocess.run([engine, "exec", container, "python", "-m",
                                 "moe_router.doors.healthcheck"], capture_output=True,
                                text=True, timeout=60)
        assert inside.returncode == 0, inside.stdout + inside.stderr
        assert inside.stdout == "SERVING: the server ('') at 127.0.0.1:50051\n"
        stop = subprocess.run([engine, "stop", "-t", "30", container], capture_output=True,
                              text=True, timeout=90)
        assert stop.returncode == 0, stop.stderr
        code = subprocess.run([engine, "inspect", "--format", "{{.State.ExitCode}}", container],
                              capture_output=True, text=True, timeout=60).stdout.strip()
        assert code == "0", _logs(engine, container)
    finally:
        subprocess.run([engine, "rm", "-f", container], capture_output=True, timeout=60)


def _logs(engine: str, container: str) -> str:
    done = subprocess.run([engine, "logs", container], capture_output=True, text=True,
                          timeout=60)
    return done.stdout[-4000:] + done.stderr[-4000:]
