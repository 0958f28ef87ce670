"""The command line as people use it: one line and a non-zero exit for every mistake."""

from __future__ import annotations

import json

import pytest
from inprocess_server import serve_in_process
from server_process import small_routers, write_config

from moe_router import __version__
from moe_router.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own exits (--version, usage mistakes)
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "message"), [
    (("route", "--tokens", "-1"), "argument --tokens: must be >= 1, got -1"),
    (("route", "--layer", "x"), "argument --layer: expected an integer, got 'x'"),
    (("simulate", "--experts", "0"), "argument --experts: must be >= 1, got 0"),
    (("simulate", "--top-k", "9", "--experts", "4"), "--top-k: must be <= --experts (4), got 9"),
    (("stats", "--timeout", "0"), "argument --timeout: must be > 0, got 0.0"),
    (("route", "--dtype", "int8"), "argument --dtype: invalid choice: 'int8'"),
    (("launch",), "argument command: invalid choice: 'launch'"),
])
def test_a_usage_mistake_is_one_line_and_exit_2(capsys, argv, message) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_a_server_that_is_not_there_is_one_line_and_exit_1(capsys) -> None:
    code, _, err = _run(capsys, "route", "--target", "127.0.0.1:1", "--timeout", "2")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("moe-router route: UNAVAILABLE: ") and "--target" in err


def test_version_and_help_on_every_flag(capsys) -> None:
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"moe-router {__version__}"
    for command in ("serve", "route", "stats", "simulate", "bench"):
        code, out, _ = _run(capsys, command, "--help")
        assert code == 0
        flags = [line.split()[0] for line in out.splitlines()
                 if line.startswith("  --") and line.split()[0] != "--help"]
        assert flags, command
        for line in out.split("options:")[1].split("\n  --")[1:]:
            assert len(line.split()) > 1, f"{command}: a flag without help: --{line}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("cli") / "config.yaml", small_routers()[:1])
    with serve_in_process(config) as running:
        yield running


def test_an_unknown_layer_is_the_servers_one_line_and_exit_2(capsys, server) -> None:
    code, _, err = _run(capsys, "route", "--target", server.target, "--layer", "99")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("moe-router route: NOT_FOUND: ") and "no layer 99" in err


def test_an_unknown_router_is_one_line_and_exit_1(capsys, server) -> None:
    code, _, err = _run(capsys, "route", "--target", server.target, "--router", "nope")
    assert code == 1 and "unknown router 'nope'; the server hosts ['mixtral']" in err


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_route_sends_every_dtype(capsys, server, dtype) -> None:
    code, out, _ = _run(capsys, "route", "--target", server.target, "--tokens", "3",
                        "--dtype", dtype, "--json")
    answer = json.loads(out)
    assert code == 0 and len(answer["expert_indices"]) == 3
    assert all(len(e) == 2 and 0 <= min(e) and max(e) < 8 for e in answer["expert_indices"])


def test_simulate_prints_a_summary_and_json_on_request(capsys) -> None:
    code, out, _ = _run(capsys, "simulate", "--tokens", "256", "--experts", "8", "--top-k", "2",
                        "--devices", "2")
    assert code == 0 and out.startswith("256 tokens, top-2 of 8 experts")
    assert "Jain" in out and "all-to-all" in out and len(out.splitlines()) == 4
    code, out, _ = _run(capsys, "simulate", "--tokens", "256", "--experts", "8", "--top-k", "2",
                        "--json")
    figures = json.loads(out)
    assert sum(figures["load_balance"]["tokens_per_expert"]) == 512
    assert set(figures) == {"load_balance", "communication", "placement"}

