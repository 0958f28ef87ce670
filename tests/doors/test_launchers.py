"""Every launcher starts the server with the same glibc malloc tuning (README "Large
messages"): the Makefile, the Dockerfile and the CLI's own re-exec."""

from __future__ import annotations

import re
from pathlib import Path

from moe_router.config.environment import MALLOC_TUNING

ROOT = Path(__file__).resolve().parents[2]


def _settings(text: str) -> dict[str, str]:
    return dict(re.findall(r"(MALLOC_[A-Z_]+_)=(\d+)", text))


def test_makefile_and_dockerfile_use_the_clis_malloc_tuning():
    assert _settings((ROOT / "Makefile").read_text()) == MALLOC_TUNING
    assert _settings((ROOT / "Dockerfile").read_text()) == MALLOC_TUNING


def test_mmap_threshold_is_within_what_glibc_accepts():
    # glibc ignores M_MMAP_THRESHOLD above 32 MiB on 64-bit hosts.
    assert int(MALLOC_TUNING["MALLOC_MMAP_THRESHOLD_"]) <= 32 * 1024 * 1024


def test_container_config_listens_beyond_loopback(tmp_path):
    import shlex
    import subprocess

    from moe_router.config import load_config

    dockerfile = (ROOT / "Dockerfile").read_text()
    script = re.search(r"&& (sed '[^']*') /tmp/config.yaml", dockerfile)
    assert script, "the Dockerfile no longer rewrites the listen addresses with sed"
    rewritten = subprocess.run(
        [*shlex.split(script.group(1)), str(ROOT / "config.yaml")],
        capture_output=True, text=True, check=True,
    ).stdout
    path = tmp_path / "config.yaml"
    path.write_text(rewritten)
    config = load_config(path, env={})
    assert (config.server.host, config.metrics.host, config.health.host) == ("0.0.0.0",) * 3
