"""The kustomizations of deploy/, rendered with kubectl and looked at by kind (deploy tests)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
#: Every kustomization a user renders: the two overlays and the KServe example.
RENDERED = {
    "cpu": DEPLOY / "overlays" / "cpu",
    "gpu": DEPLOY / "overlays" / "gpu",
    "kserve": DEPLOY / "kserve",
}


@dataclass(frozen=True)
class Rendered:
    """One kustomization's output: its objects, found by kind and name."""

    name: str
    objects: tuple[dict[str, Any], ...]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"{self.name}: expected one {kind}, found {len(found)}"
        return found[0]

    def config_text(self) -> str:
        """config.yaml as the generated ConfigMap carries it."""
        return self.one("ConfigMap")["data"]["config.yaml"]

    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_text())

    def pod_spec(self) -> dict[str, Any]:
        """The server pod's spec: the Deployment's template, or the KServe predictor."""
        if self.of_kind("Deployment"):
            return self.one("Deployment")["spec"]["template"]["spec"]
        return self.one("InferenceService")["spec"]["predictor"]

    def server_container(self) -> dict[str, Any]:
        containers = self.pod_spec()["containers"]
        assert len(containers) == 1, f"{self.name}: one server container expected"
        return containers[0]


def kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize DIR``, parsed."""
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return tuple(o for o in yaml.safe_load_all(done.stdout) if o)
