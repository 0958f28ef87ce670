"""Fixtures of the deploy tests."""

from __future__ import annotations

import shutil

import pytest
from deploy_manifests import RENDERED, Rendered, kustomize


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    """Every kustomization, rendered once per session (skipped without kubectl)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered")
    return {name: Rendered(name, kustomize(path)) for name, path in RENDERED.items()}
