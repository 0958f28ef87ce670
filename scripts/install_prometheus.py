"""Install Prometheus and promtool (Debian's ``prometheus`` package) where we can, for `make test`.

promtool lints the metrics and unit-tests deploy/prometheus/alerts.yml; the prometheus
server runs the dashboard's and the alerts' queries against a real moe-router
(tests/deploy/test_prometheus_live.py). Without root or apt-get, or when the install
fails, this says so and exits 0: those tests then skip, naming what is missing. The
package's own service is never started (tests start their own on loopback).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

BINARIES = ("prometheus", "promtool")


def main() -> int:
    """Return 0 whether or not the binaries could be installed; say which."""
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if not missing:
        return 0
    if not shutil.which("apt-get") or os.geteuid() != 0:
        print(f"{' and '.join(missing)} not installed (needs root and apt-get); "
              "their tests will skip")
        return 0
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300, **quiet)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
            check=True, timeout=600, **quiet,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"prometheus not installed ({exc}); its tests will skip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
