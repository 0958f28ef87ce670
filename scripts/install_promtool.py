"""Install promtool (Debian's ``prometheus`` package) where we can, so `make test` lints metrics.

Skips quietly without root or apt-get; the metrics lint test then skips too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def main() -> int:
    """Return 0 whether or not promtool could be installed; say which."""
    if shutil.which("promtool"):
        return 0
    if not shutil.which("apt-get") or os.geteuid() != 0:
        print("promtool not installed (needs root and apt-get); its lint test will skip")
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
        print(f"promtool not installed ({exc}); its lint test will skip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
