"""config.yaml + environment + overrides -> ServiceConfig: defaults, precedence, every error."""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from pathlib import Path

import pytest

from moe_router.config import (
    ALIASES,
    PRECEDENCE,
    BatchingConfig,
    BreakerConfig,
    CacheConfig,
    HealthConfig,
    MetricsConfig,
    RouterKind,
    ServerConfig,
    ServiceConfig,
    default_config_text,
    env_variables,
    load_config,
)
from moe_router.errors import RouterConfigurationError
from moe_router.routing.router_config import GroupScore, ScoringFunction

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"
ROUTER = "routers: [{name: r, kind: top_k, input_dim: 16, num_experts: 4}]\n"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str, **kwargs: object) -> ServiceConfig:
    return load_config(write(tmp_path, text), env=kwargs.pop("env", {}), **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the default
def test_repo_config_yaml_is_the_embedded_default() -> None:
    assert REPO_CONFIG.read_text("utf-8") == default_config_text()


def _without_sources(config: ServiceConfig) -> ServiceConfig:
    routers = tuple(dataclasses.replace(r, source="") for r in config.routers)
    return dataclasses.replace(config, source="", routers=routers)


def test_repo_config_file_loads_like_the_embedded_default() -> None:
    from_file = load_config(REPO_CONFIG, env={})
    assert from_file.source == str(REPO_CONFIG)
    assert from_file.routers[2].source == f"{REPO_CONFIG}: routers[2]"
    assert _without_sources(from_file) == _without_sources(load_config(None, env={}))


def test_default_config_serves_the_documented_routers() -> None:
    config = load_config(env={})
    by_name = {r.name: r for r in config.routers}
    assert list(by_name) == ["mixtral", "qwen3", "deepseek-v3", "dynamic"]
    mixtral, qwen, deepseek, dynamic = by_name.values()
    assert (mixtral.kind, mixtral.input_dim, mixtral.num_experts, mixtral.top_k) == (
        RouterKind.TOP_K, 4096, 8, 2)
    assert mixtral.renormalize and mixtral.layers == 4
    assert (qwen.num_experts, qwen.top_k, qwen.input_dim, qwen.layers) == (128, 8, 2048, 4)
    assert deepseek.kind is RouterKind.GROUPED_TOP_K
    assert (deepseek.num_experts, deepseek.top_k, deepseek.n_group, deepseek.topk_group) == (
        256, 8, 8, 4)
    assert deepseek.scoring is ScoringFunction.SIGMOID
    assert deepseek.group_score is GroupScore.TOP2_SUM
    assert deepseek.use_correction_bias and deepseek.routed_scaling_factor == 2.5
    assert (deepseek.input_dim, deepseek.layers) == (7168, 2)
    assert dynamic.kind is RouterKind.DYNAMIC
    assert (dynamic.input_dim, dynamic.num_experts, dynamic.min_experts, dynamic.max_experts) == (
        768, 8, 1, 4)
    assert config.server == ServerConfig()
    assert config.security.api_keys == ()


def test_omitted_sections_take_the_dataclass_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, ROUTER)
    assert config.server == ServerConfig()
    assert config.metrics == MetricsConfig() and config.health == HealthConfig()
    assert config.batching == BatchingConfig() and config.cache == CacheConfig()
    assert config.breaker == BreakerConfig()
    assert config.server.port == 50051 and config.server.max_message_bytes == 256 * 1024 * 1024
    assert config.routers[0].batching == BatchingConfig()
    assert config.routers[0].weights.seed == 0 and config.routers[0].weights.path is None


def test_config_is_frozen() -> None:
    config = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]


def _all_dataclasses(cls: type, seen: set[type]) -> set[type]:
    seen.add(cls)
    for hint in typing.get_type_hints(cls).values():
        for candidate in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(candidate) and candidate not in seen:
                _all_dataclasses(candidate, seen)  # type: ignore[arg-type]
    return seen


def test_every_field_is_documented() -> None:
    for cls in _all_dataclasses(ServiceConfig, set()):
        assert cls.__doc__, cls
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"


def test_router_batching_overrides_merge_over_the_top_level(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
        batching: {max_batch_tokens: 4096, max_queue_delay_us: 100}
        routers:
          - {name: a, kind: top_k, input_dim: 16, num_experts: 4}
          - {name: b, kind: top_k, input_dim: 16, num_experts: 4,
             batching: {max_queue_delay_us: 0, enabled: false}, cache_enabled: false}
    """)
    a, b = config.routers
    assert a.batching == BatchingConfig(max_batch_tokens=4096, max_queue_delay_us=100)
    assert b.batching == BatchingConfig(enabled=False, max_batch_tokens=4096,
                                        max_queue_delay_us=0)
    assert a.cache_enabled and not b.cache_enabled


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    assert load_text(tmp_path, "server: {log_level: debug}\n" + ROUTER).server.log_level == "DEBUG"


# --------------------------------------------------------------------------- precedence
def test_precedence_is_declared_lowest_first() -> None:
    assert PRECEDENCE == ("defaults", "file", "environment", "overrides")


def test_file_beats_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "server: {port: 6000}\n" + ROUTER).server.port == 6000


def test_environment_beats_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, ROUTER, env={"DYNAMIC_MOE_PORT": "7000"})
    assert config.server.port == 7000


def test_environment_beats_file(tmp_path: Path) -> None:
    config = load_text(tmp_path, "server: {port: 6000, host: 0.0.0.0}\n" + ROUTER,
                       env={"DYNAMIC_MOE_PORT": "7000"})
    assert config.server.port == 7000
    assert config.server.host == "0.0.0.0"  # the rest of the section still comes from the file


def test_override_beats_environment(tmp_path: Path) -> None:
    config = load_text(tmp_path, "server: {port: 6000}\n" + ROUTER,
                       env={"DYNAMIC_MOE_PORT": "7000"}, overrides={"server.port": 0})
    assert config.server.port == 0


def test_override_beats_file(tmp_path: Path) -> None:
    config = load_text(tmp_path, "server: {device: cpu}\n" + ROUTER,
                       overrides={"server.device": "cuda:1"})
    assert config.server.device == "cuda:1"


# var, text from the environment, dotted key, value in the file, typed value from the env
ENV_CASES = [
    ("DYNAMIC_MOE_PORT", "7001", "server.port", 6001, 7001),
    ("DYNAMIC_MOE_DEVICE", "cpu", "server.device", "cuda", "cpu"),
    ("DYNAMIC_MOE_MAX_WORKERS", "9", "server.max_workers", 2, 9),
    ("DYNAMIC_MOE_LOG_LEVEL", "warning", "server.log_level", "ERROR", "WARNING"),
    ("DYNAMIC_MOE_ENABLE_MONITORING", "no", "metrics.enabled", True, False),
    ("DYNAMIC_MOE_METRICS_PORT", "9191", "metrics.port", 9001, 9191),
    ("DYNAMIC_MOE_METRICS_EXPERT_GRANULARITY", "router", "metrics.expert_granularity", "off",
     "router"),
    ("DYNAMIC_MOE_HEALTH_PORT", "8181", "health.port", 8001, 8181),
    ("DYNAMIC_MOE_ENABLE_CACHING", "0", "cache.enabled", True, False),
    ("DYNAMIC_MOE_CACHE_SIZE", "77", "cache.cache_size", 5, 77),
    ("DYNAMIC_MOE_ALERT_WEBHOOK", "http://hook", "monitoring.alert_webhook", "http://file",
     "http://hook"),
    ("DYNAMIC_MOE_RATE_LIMIT", "1000", "security.rate_limit", 10, 1000),
    ("DYNAMIC_MOE_AUTOSCALE", "false", "optimization.enable_autoscaling", True, False),
    ("DYNAMIC_MOE_EVENT_LOOP_CPU", "1", "server.event_loop_cpu", 0, 1),
]


def _get(config: ServiceConfig, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _yaml_for(dotted: str, value: object) -> str:
    section, key = dotted.split(".")
    rendered = str(value).lower() if isinstance(value, bool) else repr(value)
    return f"{section}: {{{key}: {rendered}}}\n" + ROUTER


@pytest.mark.parametrize(("var", "text", "dotted", "in_file", "expected"), ENV_CASES)
def test_each_variable_beats_the_file(
    tmp_path: Path, var: str, text: str, dotted: str, in_file: object, expected: object
) -> None:
    path = write(tmp_path, _yaml_for(dotted, in_file))
    assert _get(load_config(path, env={}), dotted) == (
        in_file.upper() if dotted == "server.log_level" else in_file)  # type: ignore[union-attr]
    assert _get(load_config(path, env={var: text}), dotted) == expected


@pytest.mark.parametrize(("var", "text", "dotted", "in_file", "expected"), ENV_CASES)
def test_each_override_beats_its_variable(
    tmp_path: Path, var: str, text: str, dotted: str, in_file: object, expected: object
) -> None:
    path = write(tmp_path, ROUTER)
    config = load_config(path, env={var: text}, overrides={dotted: in_file})
    assert _get(config, dotted) == (
        in_file.upper() if dotted == "server.log_level" else in_file)  # type: ignore[union-attr]


def test_ssl_variable_turns_tls_on(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    text = "security: {tls: {cert_file: cert.pem, key_file: key.pem}}\n" + ROUTER
    assert not load_text(tmp_path, text).security.tls.enabled
    assert load_text(tmp_path, text, env={"DYNAMIC_MOE_SSL_ENABLED": "yes"}).security.tls.enabled


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False),
])
def test_environment_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    config = load_text(tmp_path, ROUTER, env={"DYNAMIC_MOE_ENABLE_CACHING": text})
    assert config.cache.enabled is expected


@pytest.mark.parametrize(("env", "fragment"), [
    ({"DYNAMIC_MOE_ENABLE_CACHING": "maybe"},
     "environment variable DYNAMIC_MOE_ENABLE_CACHING: cache.enabled: must be a boolean"),
    ({"DYNAMIC_MOE_PORT": "http"},
     "environment variable DYNAMIC_MOE_PORT: server.port: must be an integer, got 'http'"),
    ({"DYNAMIC_MOE_PORT": "70000"},
     "environment variable DYNAMIC_MOE_PORT: server.port: must be <= 65535, got 70000"),
    ({"DYNAMIC_MOE_CACHE_SIZE": "0"},
     "environment variable DYNAMIC_MOE_CACHE_SIZE: cache.cache_size: must be >= 1, got 0"),
    ({"DYNAMIC_MOE_DEVICE": "gpu"},
     "environment variable DYNAMIC_MOE_DEVICE: server.device: must be 'auto'"),
    ({"DYNAMIC_MOE_LOG_LEVEL": "loud"},
     "environment variable DYNAMIC_MOE_LOG_LEVEL: server.log_level: must be one of"),
    ({"DYNAMIC_MOE_PROT": "1"},
     "environment variable DYNAMIC_MOE_PROT: unknown; did you mean DYNAMIC_MOE_PORT?"),
    ({"DYNAMIC_MOE_API_KEY_REQUIRED": "true"},
     "environment variable DYNAMIC_MOE_API_KEY_REQUIRED: security.api_key_required: is true "
     "but no API key is configured"),
])
def test_bad_environment_values_name_the_variable(
    tmp_path: Path, env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(RouterConfigurationError) as info:
        load_text(tmp_path, ROUTER, env=env)
    assert fragment in str(info.value)


def test_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    config = load_text(tmp_path, "server: {port: 6000}\n" + ROUTER, env={"DYNAMIC_MOE_PORT": " "})
    assert config.server.port == 6000


def test_unrelated_variables_are_ignored(tmp_path: Path) -> None:
    config = load_text(tmp_path, ROUTER, env={"PORT": "1", "HOME": "/root"})
    assert config.server.port == 50051


def test_env_variables_cover_the_seed_list() -> None:
    seed_vars = {
        "DYNAMIC_MOE_LOG_LEVEL", "DYNAMIC_MOE_CACHE_SIZE", "DYNAMIC_MOE_MAX_WORKERS",
        "DYNAMIC_MOE_ENABLE_CACHING", "DYNAMIC_MOE_ENABLE_MONITORING", "DYNAMIC_MOE_AUTOSCALE",
        "DYNAMIC_MOE_METRICS_PORT", "DYNAMIC_MOE_HEALTH_PORT", "DYNAMIC_MOE_ALERT_WEBHOOK",
        "DYNAMIC_MOE_API_KEY_REQUIRED", "DYNAMIC_MOE_SSL_ENABLED", "DYNAMIC_MOE_RATE_LIMIT",
    }
    assert seed_vars <= set(env_variables())
    tested = {var for var, *_ in ENV_CASES}
    tested |= {"DYNAMIC_MOE_SSL_ENABLED", "DYNAMIC_MOE_API_KEY_REQUIRED"}
    assert tested == set(env_variables())  # every variable has a precedence test


def test_config_path_from_environment_when_no_path_given(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 6123}\n" + ROUTER, name="other.yaml")
    assert load_config(env={"DYNAMIC_MOE_CONFIG": str(path)}).server.port == 6123
    assert load_config(env={}).server.port == 50051


def test_string_overrides_are_parsed_like_the_environment(tmp_path: Path) -> None:
    config = load_text(tmp_path, ROUTER, overrides={
        "server.port": "6200", "cache.enabled": "no", "breaker.wait_duration_s": "1.5"})
    assert (config.server.port, config.cache.enabled, config.breaker.wait_duration_s) == (
        6200, False, 1.5)


# --------------------------------------------------------------------------- aliases, seed
def test_aliases_set_their_targets_and_mirror_them(tmp_path: Path) -> None:
    config = load_text(tmp_path, textwrap.dedent("""
        optimization: {enable_caching: false, max_workers: 8, cache_size: 50}
        monitoring: {enable_circuit_breaker: false}
    """) + ROUTER)
    assert (config.cache.enabled, config.server.max_workers, config.cache.cache_size) == (
        False, 8, 50)
    assert not config.breaker.enabled
    assert (config.optimization.enable_caching, config.optimization.max_workers,
            config.optimization.cache_size) == (False, 8, 50)
    assert not config.monitoring.enable_circuit_breaker


def test_alias_and_target_with_the_same_value_are_accepted(tmp_path: Path) -> None:
    config = load_text(tmp_path, "optimization: {max_workers: 8}\nserver: {max_workers: 8}\n"
                       + ROUTER)
    assert config.server.max_workers == 8


def test_variable_beats_an_alias_in_the_file(tmp_path: Path) -> None:
    config = load_text(tmp_path, "optimization: {cache_size: 50}\n" + ROUTER,
                       env={"DYNAMIC_MOE_CACHE_SIZE": "60"})
    assert config.cache.cache_size == 60 and config.optimization.cache_size == 60


def test_alias_targets_are_known_keys() -> None:
    defaults = ServiceConfig()
    for alias, target in ALIASES.items():
        assert _get(defaults, alias) == _get(defaults, target)


SEED_CONFIG = """\
# Dynamic MoE Router Configuration
router:
  input_dim: 768
  num_experts: 8
  min_experts: 1
  max_experts: 4
  complexity_estimator: "gradient_norm"
  routing_strategy: "top_k"
  load_balancing: true
  noise_factor: 0.1

optimization:
  enable_autoscaling: true
  enable_parallel: true
  enable_caching: true
  max_workers: 4
  cache_size: 1000

monitoring:
  enable_circuit_breaker: true
  alert_thresholds:
    avg_latency_ms: 50.0
    error_rate: 0.05
    load_balance_variance: 0.1
    memory_usage_mb: 1000.0

benchmarking:
  num_runs: 100
  warmup_runs: 10
  batch_sizes: [1, 8, 16, 32]
  sequence_lengths: [128, 256, 512]
"""


def test_the_seed_config_yaml_loads(tmp_path: Path) -> None:
    config = load_text(tmp_path, SEED_CONFIG)
    (router,) = config.routers
    assert (router.name, router.kind, router.input_dim, router.num_experts) == (
        "default", RouterKind.DYNAMIC, 768, 8)
    assert (router.min_experts, router.max_experts, router.noise_factor) == (1, 4, 0.1)
    assert router.complexity_estimator.value == "gradient_norm" and router.load_balancing
    assert router.weights.path is None
    assert config.benchmarking.batch_sizes == (1, 8, 16, 32)
    assert config.monitoring.alert_thresholds.error_rate == 0.05
    assert config.breaker.enabled and config.cache.enabled and config.cache.cache_size == 1000


def test_seed_router_errors_name_the_router_block(tmp_path: Path) -> None:
    path = write(tmp_path, SEED_CONFIG.replace("max_experts: 4", "max_experts: 12"))
    with pytest.raises(RouterConfigurationError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: router.max_experts: ")


# --------------------------------------------------------------------------- security
def test_api_keys_from_file_and_variable_and_hidden_from_repr(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("# team keys\nalpha\n\n  beta  \n#gamma\n")
    config = load_text(tmp_path, textwrap.dedent("""
        security: {api_key_required: true, api_keys_file: keys.txt, api_keys_env: MY_KEYS}
    """) + ROUTER, env={"MY_KEYS": "delta, alpha,,", "DYNAMIC_MOE_API_KEYS": "ignored"})
    assert config.security.api_keys == ("alpha", "beta", "delta")
    assert config.security.api_keys_file == tmp_path / "keys.txt"
    for text in (repr(config), repr(config.security), str(config)):
        assert "alpha" not in text and "delta" not in text


def test_api_keys_from_the_default_variable(tmp_path: Path) -> None:
    config = load_text(tmp_path, ROUTER, env={"DYNAMIC_MOE_API_KEY_REQUIRED": "1",
                                              "DYNAMIC_MOE_API_KEYS": "k1,k2"})
    assert config.security.api_key_required and config.security.api_keys == ("k1", "k2")


def test_tls_files_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    for name in ("server.crt", "server.key", "ca.pem"):
        (tmp_path / "tls" / name).write_text("pem")
    config = load_text(tmp_path, textwrap.dedent("""
        security:
          tls: {enabled: true, cert_file: tls/server.crt, key_file: tls/server.key,
                client_ca_file: tls/ca.pem}
    """) + ROUTER)
    tls = config.security.tls
    assert tls.cert_file == tmp_path / "tls" / "server.crt"
    assert tls.client_ca_file == tmp_path / "tls" / "ca.pem"


def test_capacity_options_reach_the_router_config(tmp_path: Path) -> None:
    config = load_text(tmp_path, textwrap.dedent("""\
        routers:
          - {name: switch, kind: top_k, input_dim: 16, num_experts: 8, top_k: 1,
             renormalize: false, expert_capacity: 4, capacity_scope: sequence,
             drop_policy: position, pad_to_capacity: true}
          - {name: nllb, kind: top_k, input_dim: 16, num_experts: 8, capacity_factor: 1.0,
             capacity_priority: slot, renormalize_after_drop: true}
          - {name: v3, kind: grouped_top_k, input_dim: 16, num_experts: 8, n_group: 2,
             topk_group: 1, aux_loss_assignments: selected}
    """))
    switch, nllb, v3 = (spec.router_config() for spec in config.routers)
    assert (switch.expert_capacity, switch.capacity_scope.value, switch.pad_to_capacity) == (
        4, "sequence", True)
    assert switch.capacity_factor is None and switch.drops_tokens
    assert (nllb.capacity_priority.value, nllb.renormalize_after_drop) == ("slot", True)
    assert v3.aux_loss_assignments.value == "selected" and not v3.drops_tokens


# --------------------------------------------------------------------------- every error
R = "routers:\n  - {name: r, kind: top_k, input_dim: 16, num_experts: 8"  # + extra keys + "}"

BAD_CONFIGS = [
    # unknown keys, with and without a suggestion
    ("servr: {}\n" + ROUTER, "servr: unknown key; did you mean 'server'?"),
    ("server: {prot: 1}\n" + ROUTER, "server.prot: unknown key; did you mean 'port'?"),
    ("server: {zzz: 1}\n" + ROUTER,
     "server.zzz: unknown key; valid keys: busy_poll_us, device, drain_delay_s"),
    (R + ", top_kk: 2}\n", "routers[0].top_kk: unknown key; did you mean 'top_k'?"),
    (R + ", weights: {seeds: 1}}\n", "routers[0].weights.seeds: unknown key; did you mean 'seed'"),
    ("security: {tls: {enable: true}}\n" + ROUTER,
     "security.tls.enable: unknown key; did you mean 'enabled'?"),
    # types and bounds
    ("server: {port: http}\n" + ROUTER, "server.port: must be an integer, got 'http' (str)"),
    ("server: {port: 70000}\n" + ROUTER, "server.port: must be <= 65535, got 70000"),
    ("server: {port: true}\n" + ROUTER, "server.port: must be an integer, got True (bool)"),
    ("server: {device: gpu}\n" + ROUTER,
     "server.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("server: {max_workers: 0}\n" + ROUTER, "server.max_workers: must be >= 1, got 0"),
    ("server: {log_level: loud}\n" + ROUTER, "server.log_level: must be one of 'DEBUG'"),
    ("server: {drain_grace_s: .nan}\n" + ROUTER, "server.drain_grace_s: must be finite"),
    ("metrics: {enabled: 'yes'}\n" + ROUTER, "metrics.enabled: must be true or false, got 'yes'"),
    ("server: [1, 2]\n" + ROUTER, "server: must be a mapping, got [1, 2] (list)"),
    ("cache: {ttl_seconds: 0}\n" + ROUTER, "cache.ttl_seconds: must be > 0, got 0.0"),
    ("breaker: {failure_rate_threshold: 1.5}\n" + ROUTER,
     "breaker.failure_rate_threshold: must be <= 1, got 1.5"),
    ("breaker: {wait_multiplier: 0.5}\n" + ROUTER, "breaker.wait_multiplier: must be >= 1"),
    ("monitoring: {alert_thresholds: {error_rate: 2}}\n" + ROUTER,
     "monitoring.alert_thresholds.error_rate: must be <= 1, got 2.0"),
    ("benchmarking: {batch_sizes: [1, 0]}\n" + ROUTER,
     "benchmarking.batch_sizes[1]: must be >= 1, got 0"),
    ("benchmarking: {batch_sizes: 8}\n" + ROUTER, "benchmarking.batch_sizes: must be a list"),
    # cross-field, with how to fix
    ("breaker: {minimum_number_of_calls: 200}\n" + ROUTER,
     "breaker.minimum_number_of_calls: must be <= breaker.sliding_window_size (100), got 200"),
    ("breaker: {max_wait_duration_s: 1.0}\n" + ROUTER,
     "breaker.max_wait_duration_s: must be >= breaker.wait_duration_s (5.0)"),
    ("metrics: {port: 50051}\n" + ROUTER, "metrics.port: 50051 is also server.port"),
    ("health: {port: 9090}\n" + ROUTER, "health.port: 9090 is also metrics.port"),
    ("security: {api_key_required: true}\n" + ROUTER,
     "security.api_key_required: is true but no API key is configured; list keys in "
     "security.api_keys_file or set DYNAMIC_MOE_API_KEYS=key1,key2"),
    ("security: {api_keys_file: nope.txt}\n" + ROUTER, "security.api_keys_file: file not found"),
    ("security: {api_keys: [a]}\n" + ROUTER, "security.api_keys: cannot be set"),
    ("security: {tls: {enabled: true}}\n" + ROUTER,
     "security.tls.enabled: is true but security.tls.cert_file is not set"),
    ("security: {tls: {enabled: true, cert_file: c.pem, key_file: k.pem}}\n" + ROUTER,
     "security.tls.cert_file: file not found"),
    ("security: {tls: {client_ca_file: ca.pem}}\n" + ROUTER,
     "security.tls.client_ca_file: needs security.tls.enabled: true"),
    ("optimization: {max_workers: 8}\nserver: {max_workers: 2}\n" + ROUTER,
     "optimization.max_workers: is an alias of server.max_workers, which is also set"),
    ("monitoring: {enable_circuit_breaker: false}\nbreaker: {enabled: true}\n" + ROUTER,
     "monitoring.enable_circuit_breaker: is an alias of breaker.enabled"),
    ("optimization: {cache_size: 0}\n" + ROUTER, "optimization.cache_size: must be >= 1, got 0"),
    ("optimization: {max_workers: many}\n" + ROUTER,
     "optimization.max_workers: must be an integer"),
    # routers
    ("server: {}\n", "routers: must be a non-empty list of routers"),
    ("routers: []\n", "routers: must be a non-empty list"),
    ("routers: [7]\n", "routers[0]: must be a mapping with name, kind, input_dim"),
    ("routers: [{name: r, input_dim: 16, num_experts: 8}]\n",
     "routers[0]: missing required key 'kind'"),
    (R.replace("kind: top_k", "kind: magic") + "}\n",
     "routers[0].kind: must be one of 'top_k', 'grouped_top_k'"),
    (R.replace("name: r", "name: Big Router") + "}\n",
     "routers[0].name: must be lowercase letters, digits, '_' and '-', got 'Big Router'"),
    (R + "}\n  - {name: r, kind: top_k, input_dim: 8, num_experts: 2}\n",
     "routers[1].name: duplicate router name 'r' (also routers[0])"),
    (R.replace("num_experts: 8", "num_experts: 8, top_k: 12") + "}\n",
     "routers[0].top_k: must be <= num_experts (8), got 12"),
    (R.replace("input_dim: 16", "input_dim: 0") + "}\n",
     "routers[0].input_dim: must be a positive integer, got 0"),
    (R + ", layers: 0}\n", "routers[0].layers: must be >= 1, got 0"),
    (R + ", scoring: relu}\n", "routers[0].scoring: must be one of 'softmax', 'sigmoid'"),
    (R + ", n_group: 3}\n", "routers[0].n_group: is not used by kind 'top_k' "
     "(only by grouped_top_k); remove it"),
    (R + ", min_experts: 2}\n", "routers[0].min_experts: is not used by kind 'top_k'"),
    (R + ", fault: {slow_ms: 1}}\n", "routers[0].fault: is not used by kind 'top_k'"),
    (R + ", capacity_factor: -1}\n", "routers[0].capacity_factor: must be > 0 or None"),
    (R + ", capacity_factor: 1.0, expert_capacity: 4}\n",
     "routers[0].expert_capacity: give capacity_factor or expert_capacity, not both"),
    (R + ", expert_capacity: 0}\n", "routers[0].expert_capacity: must be >= 1, got 0"),
    (R + ", pad_to_capacity: true}\n", "routers[0].pad_to_capacity: only applies with a "
     "capacity; set capacity_factor or expert_capacity, or remove this key"),
    (R + ", expert_capacity: 4, capacity_scope: batch}\n",
     "routers[0].capacity_scope: must be one of 'call', 'sequence', got 'batch'"),
    (R + ", expert_capacity: 4, capacity_priority: token}\n",
     "routers[0].capacity_priority: must be one of 'expert', 'slot'"),
    (R + ", expert_capacity: 4, renormalize: false, renormalize_after_drop: true}\n",
     "routers[0].renormalize_after_drop: needs renormalize: true"),
    (R.replace("top_k", "soft_moe") + ", aux_loss_assignments: selected}\n",
     "routers[0].aux_loss_assignments: is not used by kind 'soft_moe' (only by "),
    (R.replace("top_k", "expert_choice") + ", expert_capacity: 4}\n",
     "routers[0].expert_capacity: is not used by kind 'expert_choice'"),
    (R.replace("top_k", "grouped_top_k") + ", n_group: 3}\n",
     "routers[0].n_group: must divide num_experts (8), got 3"),
    (R.replace("top_k", "grouped_top_k") + ", n_group: 4, topk_group: 5}\n",
     "routers[0].topk_group: must be <= n_group (4), got 5"),
    (R.replace("top_k", "grouped_top_k") + ", n_group: 8, group_score: top2_sum}\n",
     "routers[0].group_score: 'top2_sum' needs at least 2 experts per group"),
    (R.replace("top_k", "grouped_top_k") + ", n_group: 4, topk_group: 1, top_k: 3}\n",
     "routers[0].top_k: must be <= topk_group * experts per group"),
    (R.replace("top_k", "expert_choice") + ", top_k: 2}\n",
     "routers[0].top_k: is not used by kind 'expert_choice'"),
    (R.replace("top_k", "expert_choice") + ", tokens_per_expert: 0}\n",
     "routers[0].tokens_per_expert: must be >= 1, got 0"),
    (R.replace("top_k", "soft_moe") + ", temperature: 0}\n",
     "routers[0].temperature: must be > 0, got 0.0"),
    (R.replace("top_k", "moe_router") + ", mechanism: argmax}\n",
     "routers[0].mechanism: must be one of 'softmax', 'gumbel'"),
    (R.replace("top_k", "dynamic") + ", max_experts: 9}\n",
     "routers[0].max_experts: must be in [min_experts=1, num_experts=8]"),
    (R.replace("top_k", "dynamic") + ", min_experts: 3, max_experts: 2}\n",
     "routers[0].max_experts: must be in [min_experts=3"),
    (R.replace("top_k", "dynamic") + ", complexity_estimator: vibes}\n",
     "routers[0].complexity_estimator: must be one of 'gradient_norm'"),
    (R.replace("top_k", "dynamic") + ", noise_factor: 2}\n",
     "routers[0].noise_factor: must be <= 1, got 2.0"),
    (R.replace("top_k", "dynamic") + ", estimator_options: [1]}\n",
     "routers[0].estimator_options: must be a mapping with string keys"),
    (R.replace("top_k", "dynamic") + ", estimator_options: {bogus: 1}}\n",
     "routers[0]: complexity_estimator 'gradient_norm': unexpected arguments ['bogus']"),
    (R.replace("top_k", "dynamic") + ", adaptation_rate: 0.1}\n",
     "routers[0].adaptation_rate: is not used by kind 'dynamic' (only by adaptive)"),
    (R.replace("top_k", "fault_injection") + "}\n",
     "routers[0].kind: 'fault_injection' routers exist only for tests; set "
     "testing.enable_fault_injection: true to allow them"),
    # weights
    (R + ", weights: {init: zeros}}\n", "routers[0].weights.init: must be one of 'random'"),
    (R + ", weights: {seed: -1}}\n", "routers[0].weights.seed: must be >= 0, got -1"),
    (R + ", weights: {gate: 'w.{layer}'}}\n",
     "routers[0].weights.gate: is used only with path (a checkpoint)"),
    (R + ", weights: {path: model.bin, gate: w}}\n",
     "routers[0].weights.path: must be a .safetensors file or a sharded "
     "model.safetensors.index.json, got 'model.bin' (pickle checkpoints are never loaded"),
    (R + ", weights: {path: missing.safetensors, gate: w}}\n",
     "routers[0].weights.path: checkpoint not found: "),
    ("routers: [{name: r, kind: top_k, input_dim: 16, num_experts: 8, weights: 3}]\n",
     "routers[0].weights: must be a mapping, got 3 (int)"),
    # the seed shorthand
    ("router: {input_dim: 8, num_experts: 4}\n" + ROUTER,
     "router: use the seed's 'router:' block or a 'routers:' list, not both"),
    ("router: {input_dim: 8, num_experts: 4, top_k: 2}\n",
     "router.top_k: is not used by kind 'dynamic'"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_CONFIGS)
def test_every_error_names_the_file_and_the_key_path(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RouterConfigurationError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message


def test_checkpoint_errors_need_a_real_file(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"")
    base = R + ", layers: 2, weights: {path: w.safetensors, gate: %s}}\n"
    for gate, fragment in [
        ("'w'", "routers[0].weights.gate: must contain '{layer}' when layers > 1"),
        ("'w.{layr}'", "routers[0].weights.gate: must be a tensor name whose only placeholder"),
    ]:
        with pytest.raises(RouterConfigurationError, match=r".*") as info:
            load_text(tmp_path, base % gate)
        assert fragment in str(info.value)
    with pytest.raises(RouterConfigurationError) as info:
        load_text(tmp_path, R + ", weights: {path: w.safetensors, gate: 'w', bias: 'b'}}\n")
    assert "routers[0].weights.bias: needs use_correction_bias: true" in str(
        info.value)
    grouped = R.replace("top_k", "grouped_top_k") + (
        ", n_group: 2, use_correction_bias: true, weights: {path: w.safetensors, gate: w}}\n")
    with pytest.raises(RouterConfigurationError) as info:
        load_text(tmp_path, grouped)
    assert "routers[0].weights.bias: is required because use_correction_bias is true" in str(
        info.value)


@pytest.mark.parametrize(("text", "fragment"), [
    ("server: {port: 1}\nserver: {port: 2}\n", "invalid YAML at line 2, column 1: duplicate key"),
    ("server: {port: [1}\n", "invalid YAML at line 1"),
    ("- a\n- b\n", "the top level must be a mapping of sections, got ['a', 'b'] (list)"),
])
def test_malformed_files_name_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RouterConfigurationError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)


def test_empty_file_means_defaults_but_needs_routers(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(RouterConfigurationError, match="routers: must be a non-empty list"):
        load_config(path, env={})


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RouterConfigurationError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", env={})


def test_override_errors_name_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTER)
    for overrides, fragment in [
        ({"server.prot": 1}, "overrides: server.prot: unknown key; did you mean 'port'?"),
        ({"server.port": "x"}, "overrides: server.port: must be an integer, got 'x'"),
        ({"server.port": -1}, "overrides: server.port: must be >= 0, got -1"),
        ({"optimization.max_workers": 3, "server.max_workers": 4},
         "overrides: optimization.max_workers: is an alias of server.max_workers"),
    ]:
        with pytest.raises(RouterConfigurationError) as info:
            load_config(path, env={}, overrides=overrides)
        assert str(info.value).startswith(fragment), str(info.value)


def test_fault_injection_allowed_when_enabled(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
        testing: {enable_fault_injection: true}
        routers:
          - {name: f, kind: fault_injection, input_dim: 8, num_experts: 4,
             fault: {fail_while_file_exists: fail.flag, slow_ms: 5}}
    """)
    fault = config.routers[0].fault
    assert fault is not None
    assert fault.fail_while_file_exists == tmp_path / "fail.flag"
    assert fault.slow_while_file_exists is None and fault.slow_ms == 5.0


def test_a_pinned_event_loop_needs_one_intra_op_thread(tmp_path: Path) -> None:
    assert load_text(tmp_path, "server: {event_loop_cpu: 0}\n" + ROUTER).server.event_loop_cpu == 0
    with pytest.raises(RouterConfigurationError,
                       match=r"server.event_loop_cpu: needs server.intra_op_threads 1, got 2"):
        load_text(tmp_path, "server: {event_loop_cpu: 0, intra_op_threads: 2}\n" + ROUTER)
