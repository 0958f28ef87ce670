"""config/environment.py: the malloc re-exec decision and the environment of child processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moe_router.config import environment
from moe_router.config.environment import (
    MALLOC_TUNING,
    REEXEC_MARK,
    child_environment,
    malloc_reexec_environment,
    malloc_variables,
)


@pytest.fixture
def no_malloc(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [*MALLOC_TUNING, REEXEC_MARK]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(environment.sys, "platform", "linux")
    return monkeypatch


def test_reexec_adds_the_missing_tunables_and_the_mark(no_malloc: pytest.MonkeyPatch) -> None:
    no_malloc.setenv("MALLOC_TOP_PAD_", "4096")  # the caller's value wins
    no_malloc.setenv("SOME_OTHER", "kept")
    env = malloc_reexec_environment()
    assert env is not None
    assert env["MALLOC_TOP_PAD_"] == "4096"
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 1024 * 1024)
    assert env["MALLOC_TRIM_THRESHOLD_"] == str(1024 * 1024 * 1024)
    assert env[REEXEC_MARK] == "1" and env["SOME_OTHER"] == "kept"


def test_no_reexec_once_marked_when_all_set_or_off_linux(no_malloc: pytest.MonkeyPatch) -> None:
    no_malloc.setenv(REEXEC_MARK, "1")
    assert malloc_reexec_environment() is None
    no_malloc.delenv(REEXEC_MARK)
    for name, value in MALLOC_TUNING.items():
        no_malloc.setenv(name, value)
    assert malloc_reexec_environment() is None
    for name in MALLOC_TUNING:
        no_malloc.delenv(name)
    no_malloc.setattr(environment.sys, "platform", "darwin")
    assert malloc_reexec_environment() is None


def test_child_environment_drops_config_variables(no_malloc: pytest.MonkeyPatch) -> None:
    no_malloc.setenv("DYNAMIC_MOE_PORT", "1234")
    no_malloc.setenv("MALLOC_TOP_PAD_", "4096")
    plain = child_environment()
    assert "DYNAMIC_MOE_PORT" not in plain and plain["MALLOC_TOP_PAD_"] == "4096"
    assert REEXEC_MARK not in plain
    tuned = child_environment(malloc_tuning=True)
    assert {k: tuned[k] for k in MALLOC_TUNING} == dict(MALLOC_TUNING)
    untuned = child_environment(malloc_tuning=False)
    assert not set(MALLOC_TUNING) & set(untuned)
    assert tuned[REEXEC_MARK] == untuned[REEXEC_MARK] == "1"
    assert malloc_variables() == {"MALLOC_TOP_PAD_": "4096"}


def test_importing_the_environment_module_loads_no_torch() -> None:
    code = ("import sys, moe_router.config.environment, moe_router.cli\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
