"""A cluster made by hand, as a user makes one: `ray start --head` on 127.0.0.2 and a second `ray start`
on 127.0.0.3, with Ray's token authentication on. evomerge joins it by address (without RAY_AUTH_MODE
in its environment), survives the second node's raylet being SIGKILLed, and refuses wrong addresses
in seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from evomerge.store import read_journal
from tests.conftest import wait_for_journal, write_spec

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_PORT = 46391


def _processes_of(temp_dir: Path) -> list:
    marker = str(temp_dir)
    return [p for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in p.info["cmdline"] or [])]


def _stop(temp_dir: Path) -> None:
    for _ in range(5):
        processes = _processes_of(temp_dir)
        if not processes:
            return
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.5)


def _ray_start(*args: str, temp_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # the head requires a token (it makes one if none exists yet)
    cmd = [RAY, "start", *args, "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    head_dir, node_dir = tmp_path_factory.mktemp("head"), tmp_path_factory.mktemp("node")
    address = f"127.0.0.2:{HEAD_PORT}"
    try:
        head = ["--head", "--node-ip-address", "127.0.0.2", "--port", str(HEAD_PORT), "--include-dashboard=false"]
        _ray_start(*head, "--num-cpus", "1", temp_dir=head_dir)
        _ray_start("--address", address, "--node-ip-address", "127.0.0.3", "--num-cpus", "2", temp_dir=node_dir)
        yield address, node_dir
    finally:
        _stop(node_dir)
        _stop(head_dir)


def _user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}


def _spec(tmp_path: Path, name: str, budget: int) -> Path:
    spec = {
        "name": name,
        "budget": budget,
        "output": str(tmp_path / "runs"),
        "evaluator": {"name": "faulty", "dataset": "wine", "hidden": [8], "device": "cpu"},
        "strategy": {"name": "m2n2", "population": 8},
        "runtime": {
            "progress": False,
            "threads": 1,
            "snapshot_every": 100,
            "executor": {"name": "ray", "workers": 3, "cpus_per_worker": 1.0, "in_flight_per_worker": 2},
        },
    }
    spec["evaluator"]["sleep_on"] = {i: 0.03 for i in range(budget)}
    return write_spec(tmp_path / f"{name}.yaml", spec)


def test_joined_by_address_survives_the_second_raylet_killed(tmp_path, two_nodes):
    address, node_dir = two_nodes
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge", "run", str(_spec(tmp_path, "hand-made", 900)), "--quiet", "--ray", address],
        env=_user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = tmp_path / "runs" / "hand-made" / "journal.jsonl"
    wait_for_journal(proc, journal, 100)
    raylets = [p for p in _processes_of(node_dir) if "raylet" in Path(p.info["cmdline"][0]).name]
    assert len(raylets) == 1
    raylets[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "runs" / "hand-made" / "summary.json").read_text())
    entries, _ = read_journal(journal)
    assert summary["evaluations"] == 900 and sorted(e["id"] for e in entries) == list(range(900))
    assert summary["failures"] == 0  # the lost node's candidates were resubmitted, none blamed
    assert sum(w["replaced"] for w in summary["workers"]) >= 1
    assert "was lost" in err


class _NotRay(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_cluster_requiring_a_token_refused_when_token_auth_is_off(tmp_path, two_nodes):
    address, _ = two_nodes
    env = {**_user_env(), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "evomerge", "run", str(_spec(tmp_path, "no-token", 20)), "--quiet", "--ray", address]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"evomerge: error: the Ray cluster at '{address}' requires token authentication: set RAY_AUTH_MODE=token and "
        "put its token in ~/.ray/auth_token or RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)"
    )
    assert not (tmp_path / "runs" / "no-token").exists()


def test_malformed_address_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "evomerge", "run", str(_spec(tmp_path, "bad", 20)), "--quiet", "--ray", "headnode"]
    result = subprocess.run(cmd, env=_user_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == "evomerge: error: --ray 'headnode': expected HOST:PORT, 'local' or 'auto'"


@pytest.mark.parametrize("kind", ["http", "closed"])
def test_wrong_address_is_refused_in_seconds(tmp_path, kind):
    """A port where something else answers, or nothing does: one line, exit 2, no run folder, no hang."""
    if kind == "http":
        server = HTTPServer(("127.0.0.2", 0), _NotRay)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        address, expected = f"127.0.0.2:{server.server_address[1]}", "answers, but not as a Ray cluster"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            address, expected = f"127.0.0.2:{s.getsockname()[1]}", "cannot reach a Ray cluster"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", "run", str(_spec(tmp_path, "wrong", 50)), "--quiet", "--ray", address],
        env=_user_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("evomerge: error: ") and expected in last and address in last
    assert time.monotonic() - start < 30
    assert not (tmp_path / "runs" / "wrong").exists()
    if kind == "http":
        server.shutdown()
