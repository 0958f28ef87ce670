"""A hash router whose gate and token table the test knows, written as a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

D, E, K, VOCAB = 16, 8, 2, 32  # hidden size, experts, experts per token, token ids


@dataclass(frozen=True)
class HashRouterFiles:
    """The router's config.yaml entry and the gate [E, D] and table [VOCAB, K] it loads."""

    entry: dict[str, Any]
    gate: torch.Tensor
    table: torch.Tensor


def write_hash_router(directory: Path, seed: int = 4) -> HashRouterFiles:
    """Seeded gate and table in ``directory/hash.safetensors`` and the ``hashed`` entry
    (DeepSeek-V4's first layers: sqrtsoftplus scores, experts by token id)."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, D, generator=gen)
    table = torch.randint(0, E, (VOCAB, K), generator=gen)
    path = directory / "hash.safetensors"
    save_file({"layers.0.gate.weight": gate, "layers.0.gate.tid2eid": table}, str(path))
    entry = {
        "name": "hashed", "kind": "hash", "input_dim": D, "num_experts": E, "top_k": K,
        "scoring": "sqrtsoftplus", "vocab_size": VOCAB, "routed_scaling_factor": 1.5,
        "weights": {"path": str(path), "gate": "layers.{layer}.gate.weight",
                    "tensors": {"token_experts": "layers.{layer}.gate.tid2eid"}},
    }
    return HashRouterFiles(entry, gate, table)
