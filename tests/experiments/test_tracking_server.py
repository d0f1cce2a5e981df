"""The pure parts of the shared tracking server: binary discovery, URIs, command lines, ports, passfile.

Starting PostgreSQL and MLflow for real is tests/e2e/test_tracking_server.py's job (``make test-e2e``).
"""

from __future__ import annotations

import os
import shlex
import socket
import stat
from pathlib import Path

import pytest

from experiments.tracking_server import (
    TrackingServerError,
    TrackingServerSettings,
    allowed_hosts,
    backend_store_uri,
    client_tracking_uri,
    ensure_passfile,
    ensure_port_free,
    find_postgres_bin_dir,
    log_tail,
    main,
    mlflow_server_command,
    postgres_server_options,
    setup_sql,
    start_postgres,
    status,
)


def _fake_binaries(folder: Path, names: tuple[str, ...] = ("initdb", "pg_ctl", "psql")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return folder


def test_the_newest_complete_debian_install_is_chosen_in_numeric_order(tmp_path: Path):
    root = tmp_path / "postgresql"
    for version in ("9.6", "13", "15"):
        _fake_binaries(root / version / "bin")
    _fake_binaries(root / "16" / "bin", names=("initdb", "pg_ctl"))  # no psql: a half-removed install
    # "9.6" > "15" as strings: the order must be numeric
    assert find_postgres_bin_dir(root, search_path="") == root / "15" / "bin"


def test_path_is_the_fallback_and_a_symlink_leads_to_the_real_folder(tmp_path: Path):
    real = _fake_binaries(tmp_path / "real" / "bin")
    on_path = tmp_path / "usr-local-bin"
    on_path.mkdir()
    # like /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb
    (on_path / "initdb").symlink_to(real / "initdb")
    assert find_postgres_bin_dir(tmp_path / "no-debian-install", search_path=str(on_path)) == real


def test_missing_binaries_say_what_to_install(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrackingServerError, match="sudo apt-get install postgresql"):
        find_postgres_bin_dir(tmp_path / "no-debian-install", search_path=str(empty))


def test_the_store_uri_points_at_loopback_and_holds_no_password():
    assert backend_store_uri(5433) == "postgresql://mlflow@127.0.0.1:5433/mlflow"
    assert backend_store_uri(6000, database="optuna") == "postgresql://mlflow@127.0.0.1:6000/optuna"


@pytest.mark.parametrize("host, expected", [("127.0.0.1", "http://127.0.0.1:5001"),
                                            ("0.0.0.0", "http://lab-server:5001"),
                                            ("::", "http://lab-server:5001"),
                                            ("::1", "http://[::1]:5001"),
                                            ("mlflow.lab.example", "http://mlflow.lab.example:5001")])
def test_clients_get_an_address_they_can_connect_to(host: str, expected: str):
    assert client_tracking_uri(host, 5001, hostname="lab-server") == expected


def test_the_mlflow_command_serves_artifacts_from_the_tracking_folder(tmp_path: Path):
    settings = TrackingServerSettings(tmp_path / "tracking", pg_port=6001, port=6002, host="0.0.0.0")
    command = mlflow_server_command(settings, python="/venv/bin/python")
    assert command[:4] == ["/venv/bin/python", "-m", "mlflow", "server"]

    def value(option: str) -> str:
        return command[command.index(option) + 1]

    assert value("--backend-store-uri") == "postgresql://mlflow@127.0.0.1:6001/mlflow"
    assert value("--artifacts-destination") == str(tmp_path / "tracking" / "artifacts")
    assert (value("--host"), value("--port")) == ("0.0.0.0", "6002")
    assert "--serve-artifacts" in command
    assert "--workers" not in command
    # bound to every address: the host name clients are told to use is accepted too
    assert value("--allowed-hosts") == f"{socket.gethostname()},{socket.gethostname()}:6002"

    tuned = TrackingServerSettings(tmp_path, workers=1, allowed_hosts="mlflow.lab.example")
    tail = mlflow_server_command(tuned)[-4:]
    assert tail == ["--workers", "1", "--allowed-hosts", "mlflow.lab.example"]


def test_postgres_listens_on_loopback_with_its_socket_in_the_folder_even_one_with_spaces(tmp_path: Path):
    settings = TrackingServerSettings(tmp_path / "team tracking", pg_port=5544)
    # pg_ctl hands -o to /bin/sh: the folder must come back as one word
    assert shlex.split(postgres_server_options(settings)) == [
        "-p", "5544", "-c", "listen_addresses=127.0.0.1",
        "-c", f"unix_socket_directories={tmp_path / 'team tracking' / 'socket'}"]


def test_a_port_in_use_is_reported_with_the_option_that_changes_it():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(TrackingServerError, match=rf"port {port} on 127\.0\.0\.1 is in use.*--port"):
            ensure_port_free("127.0.0.1", port, "--port (TRACKING_PORT)")
    ensure_port_free("127.0.0.1", port, "--port (TRACKING_PORT)")  # closed: free again


def test_the_passfile_is_private_and_its_password_kept(tmp_path: Path):
    path = tmp_path / "pgpass"
    password = ensure_passfile(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # libpq ignores a passfile others can read
    assert path.read_text() == f"127.0.0.1:*:*:mlflow:{password}\n"
    assert len(password) >= 32
    assert ensure_passfile(path) == password


def test_the_role_password_cannot_break_out_of_its_sql_literal():
    with pytest.raises(TrackingServerError):
        setup_sql("x'; DROP DATABASE mlflow; --")
    assert "PASSWORD 'abc-_123';" in setup_sql("abc-_123")


def test_settings_refuse_one_port_for_both_servers_and_a_non_port(tmp_path: Path):
    with pytest.raises(TrackingServerError, match="share port 5001"):
        TrackingServerSettings(tmp_path, pg_port=5001, port=5001)
    with pytest.raises(TrackingServerError, match="pg_port=70000"):
        TrackingServerSettings(tmp_path, pg_port=70000)


def test_a_socket_path_too_long_for_unix_sockets_is_refused_before_anything_is_created(tmp_path: Path):
    folder = tmp_path / ("x" * 100)
    with pytest.raises(TrackingServerError, match="longer than the 107 bytes"):
        start_postgres(TrackingServerSettings(folder), bin_dir=_fake_binaries(tmp_path / "bin"))
    assert not folder.exists()


def test_the_log_tail_shows_only_what_this_start_wrote(tmp_path: Path):
    log = tmp_path / "mlflow.log"
    log.write_text("an old crash\n")
    offset = log.stat().st_size
    with log.open("a") as file:
        file.write("one\ntwo\nthree\n")
    assert log_tail(log, offset, lines=2) == "two\nthree"
    assert log_tail(tmp_path / "missing.log") == ""


def test_status_of_a_fresh_folder_needs_no_postgres_and_exits_3(tmp_path: Path, capsys):
    settings = TrackingServerSettings(tmp_path)
    assert not status(settings).initialised and not status(settings).running
    assert main(["status", "--dir", str(tmp_path)]) == 3
    out = capsys.readouterr().out
    assert "no cluster in" in out and "mlflow server: stopped" in out


def test_a_pid_file_naming_another_process_is_not_taken_for_the_server(tmp_path: Path):
    settings = TrackingServerSettings(tmp_path)
    # this very process lives, but it is no `mlflow server` of this folder: stopping it would be a disaster
    settings.pid_file.write_text(f"{os.getpid()}\n")
    assert status(settings).mlflow_pid is None


def test_a_wildcard_bind_accepts_the_host_name_it_prints_for_clients():
    team = TrackingServerSettings(host="0.0.0.0", port=5001, allowed_hosts="mlflow.lab.example")
    assert allowed_hosts(team, hostname="vm7") == "mlflow.lab.example,vm7,vm7:5001"
    assert client_tracking_uri("0.0.0.0", 5001, hostname="vm7") == "http://vm7:5001"
    # loopback: MLflow's defaults (localhost, private IPs) already cover it
    assert allowed_hosts(TrackingServerSettings(), hostname="vm7") is None

