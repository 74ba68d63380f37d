"""agent.toml validation and the agent CLI's handling of bad paths: typed errors, one line, documented exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_agent
from edgeops_agent.config import load_config
from edgeops_agent.errors import ConfigError


def _config(tmp_path: Path, extra: str = "", *, data_dir: str = "data") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "dev-1"\ntarget = "ecu"\ndata_dir = "{data_dir}"\n{extra}')
    return path


@pytest.mark.parametrize(
    "socket", ["state.json", "outbox.sqlite", "slots", "trust", "../victim.txt", "sub/agent.sock", "..", "../x.sock", ".sock"]
)
def test_socket_path_cannot_name_the_agents_files_or_escape_the_data_dir(tmp_path: Path, socket: str) -> None:
    """`[endpoint] socket` is replaced at start-up: it must never point at state, slots or a file elsewhere."""
    path = _config(tmp_path, f'[endpoint]\nsocket = "{socket}"\n')
    with pytest.raises(ConfigError, match=r"endpoint\.socket") as info:
        load_config(path)
    assert "a file name ending in '.sock' (inside data_dir) or an absolute path ending in '.sock'" in str(info.value)


def test_socket_path_default_name_and_absolute(tmp_path: Path) -> None:
    assert load_config(_config(tmp_path)).socket == (tmp_path / "data" / "agent.sock").resolve()
    assert (
        load_config(_config(tmp_path, '[endpoint]\nsocket = "app.sock"\n')).socket == (tmp_path / "data" / "app.sock").resolve()
    )
    run_dir = tmp_path / "run"
    cfg = load_config(_config(tmp_path, f'[endpoint]\nsocket = "{run_dir}/edgeops.sock"\n'))
    assert cfg.socket == run_dir / "edgeops.sock"


def test_missing_data_dir_is_an_error_not_a_new_device(tmp_path: Path) -> None:
    """A typo in data_dir must not start an agent with no model on a fresh folder."""
    path = _config(tmp_path, data_dir="dta")
    with pytest.raises(ConfigError, match=r"data_dir .*dta.* does not exist"):
        load_config(path)
    assert not (tmp_path / "dta").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config(_config(tmp_path, data_dir="file"))


def test_telemetry_interval_has_a_floor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'telemetry.interval_s' must be a number >= 0.5"):
        load_config(_config(tmp_path, "[telemetry]\ninterval_s = 0.000001\n"))
    assert load_config(_config(tmp_path, "[telemetry]\ninterval_s = 0.5\n")).telemetry_interval_s == 0.5


def test_config_path_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    proc = run_agent("run", "--config", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Usage" not in proc.stderr
    assert "is a directory" in proc.stderr.lower()
    missing = run_agent("run", "--config", tmp_path / "nope.toml")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.toml" in missing.stderr


@pytest.mark.parametrize("command", ["install", "verify"])
def test_missing_bundle_file_is_bad_input_exit_2(tmp_path: Path, command: str) -> None:
    """docs/agent.md: a bundle path that does not exist is the caller's input error (2), not a rejected bundle (4)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "k.pem"
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    key.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    args = ["-d", tmp_path / "dev", "-t", "ecu"] if command == "install" else ["--key", key]
    proc = run_agent(command, tmp_path / "missing.edgeops", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "missing.edgeops" in proc.stderr and "Usage" not in proc.stderr


def test_host_verify_missing_bundle_is_exit_2_like_the_agent(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from conftest import run_edgeops

    key = tmp_path / "k.pem"
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    key.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    proc = run_edgeops("verify", tmp_path / "missing.edgeops", "--key", key)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing.edgeops" in proc.stderr


def test_session_expiry_stays_under_the_command_id_window(tmp_path: Path) -> None:
    """A command kept by the broker longer than ids are remembered could be acted on twice."""
    assert load_config(_config(tmp_path, "[mqtt]\nsession_expiry_s = 3600\n")).mqtt.session_expiry_s == 3600
    with pytest.raises(ConfigError, match=r"'mqtt\.session_expiry_s' must be an integer < 2592000"):
        load_config(_config(tmp_path, "[mqtt]\nsession_expiry_s = 2592000\n"))


def test_endpoint_replaces_only_a_stale_socket(tmp_path: Path) -> None:
    """Start-up removes a crashed run's socket, and refuses to delete anything else at that path."""
    import socket as socketlib

    from edgeops_agent.agent import Agent
    from edgeops_agent.server import EndpointServer
    from edgeops_agent.store import DataDir

    agent = Agent(DataDir(tmp_path / "dev"))
    victim = tmp_path / "victim.sock"
    victim.write_text("precious")
    with pytest.raises(ConfigError, match="is not a socket"):
        EndpointServer(victim, agent)
    assert victim.read_text() == "precious"
    stale = tmp_path / "stale.sock"
    leftover = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # the file stays, as after a kill -9
    server = EndpointServer(stale, agent)
    try:
        assert stale.is_socket()
    finally:
        server.server_close()
