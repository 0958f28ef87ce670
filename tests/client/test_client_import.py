"""The client package stays light (no torch on import) and exports exactly its intended names."""

from __future__ import annotations

import json
import subprocess
import sys

import moe_router_client

INTENDED = {
    "RouterClient", "AsyncRouterClient", "CoLocatedClient", "AsyncCoLocatedClient",
    "RouteResult", "RouteInfo", "RouterStats", "LatencySummary", "CacheStats", "BreakerStats",
    "LayerLoad", "HealthReport", "RouterHealth", "RouterInfo",
    "RouterError", "InvalidArgumentError", "NotFoundError", "UnavailableError",
    "ResourceExhaustedError", "DeadlineExceededError", "UnauthenticatedError", "InternalError",
    "error_from_rpc",
    "DType", "TensorCodecError", "to_wire", "from_wire",
}


def _fresh_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_and_numpy_use_never_import_torch() -> None:
    out = _fresh_python(
        "import json, sys\n"
        "import numpy as np\n"
        "import moe_router_client as m\n"
        "m.from_wire(m.to_wire(np.ones((2, 3), np.float32)))\n"
        "m.RouterClient('127.0.0.1:1', api_key='k', timeout=1.0).close()\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'all': sorted(m.__all__)}))\n"
    )
    report = json.loads(out)
    assert report["torch"] is False
    assert set(report["all"]) == INTENDED


def test_all_is_exactly_the_intended_names_and_each_exists() -> None:
    assert set(moe_router_client.__all__) == INTENDED
    assert len(moe_router_client.__all__) == len(INTENDED)  # no duplicates
    for name in moe_router_client.__all__:
        assert getattr(moe_router_client, name) is not None, name
