"""Helpers of the Open Inference Protocol tests: build tritonclient inputs, compare an
OIP answer with Route's bit for bit."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

#: numpy dtype tritonclient takes for each datatype (BF16: ml_dtypes.bfloat16 since r26.06).
NUMPY_OF = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}
CORE = ("expert_indices", "expert_weights", "num_experts_per_token")


def hidden(shape: tuple[int, ...], datatype: str = "FP32", seed: int = 0) -> np.ndarray:
    """Random hidden states of ``shape`` in ``datatype``'s numpy dtype."""
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return x.astype(NUMPY_OF[datatype])


def infer_input(module: Any, name: str, array: np.ndarray, datatype: str) -> Any:
    """A ``module.InferInput`` (tritonclient.grpc or .aio) holding ``array``."""
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def route_outputs(result: Any) -> dict[str, np.ndarray]:
    """A RouterClient RouteResult as the OIP outputs of the same names."""
    outputs = {name: getattr(result, name) for name in CORE}
    outputs["tokens_per_expert"] = np.asarray(result.info.tokens_per_expert, dtype=np.int64)
    for name in ("router_logits", "complexity_scores", "dispatch_weights", "combine_weights"):
        if getattr(result, name) is not None:
            outputs[name] = getattr(result, name)
    return outputs


def assert_same_bits(actual: np.ndarray, expected: np.ndarray, name: str = "") -> None:
    """Same dtype, shape and bytes (NaN-safe, -0.0-safe: a bitwise comparison)."""
    assert actual is not None, f"{name}: missing"
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert actual.tobytes() == np.ascontiguousarray(expected).tobytes(), f"{name}: bits differ"
