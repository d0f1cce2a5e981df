"""A shared MLflow tracking server on PostgreSQL, kept in a folder of the project (``make tracking-server``).

    python -m experiments.tracking_server start [--dir .tracking] [--pg-port 5433] [--port 5001] [--host H]
    python -m experiments.tracking_server status [--dir .tracking]
    python -m experiments.tracking_server stop [--dir .tracking]

``start`` initialises a PostgreSQL cluster in ``<dir>/postgres`` on first use (Debian's ``postgresql``
binaries), starts it listening on 127.0.0.1 only (its unix socket in ``<dir>/socket``, not /var/run), creates
the ``mlflow`` role and the ``mlflow`` database (and an ``optuna`` one for Optuna studies: both keep Alembic's
``alembic_version`` table, so they cannot share a database), then starts ``mlflow server`` in the background
on that database, with artifacts proxied by the server into ``<dir>/artifacts`` (team members need no shared
filesystem). It waits for the server's ``/health`` and prints, alone on stdout, the line to run::

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5001

Every command is idempotent: ``start`` on a running server says so, ``stop`` on a stopped one too.

PostgreSQL accepts the ``mlflow`` role over TCP only with its password (scram-sha-256), kept in
``<dir>/pgpass`` (mode 0600) and handed to the server through libpq's ``PGPASSFILE``, so it never shows in a
command line; the superuser connects over the unix socket only, as the operating-system user owning the
cluster (peer authentication). ``initdb`` and ``postgres`` refuse to run as root: root runs them as the
``postgres`` system user that Debian's package creates, which then owns ``<dir>/postgres``.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DIR = Path(".tracking")
DEFAULT_PG_PORT = 5433  # 5432 may be a system cluster's
DEFAULT_PORT = 5001  # 5000 is `make mlflow-ui`'s
DEFAULT_HOST = "127.0.0.1"
ROLE = "mlflow"
DATABASE = "mlflow"
#: a second database of the same cluster for Optuna studies (``hydra.sweeper.storage``)
OPTUNA_DATABASE = "optuna"
#: the system user Debian's postgresql package creates; root runs the PostgreSQL binaries as this user
POSTGRES_SYSTEM_USER = "postgres"
POSTGRES_INSTALL_ROOT = Path("/usr/lib/postgresql")
POSTGRES_BINARIES = ("initdb", "pg_ctl", "psql")
INSTALL_HINT = ("sudo apt-get install postgresql (Debian/Ubuntu), or put its bin folder (initdb, pg_ctl, "
                "psql) on PATH")
# `mlflow server` starts four workers by default; on a busy 2-core machine that takes up to a minute or two
SERVER_START_TIMEOUT_S = 240.0
POSTGRES_START_TIMEOUT_S = 120
# uvicorn stops in a second, but `mlflow server` itself (and its job runner) took up to 25 s here
STOP_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 40
# sockaddr_un.sun_path holds 107 bytes; PostgreSQL appends "/.s.PGSQL.<port>" to the socket folder
MAX_UNIX_SOCKET_PATH = 107


class TrackingServerError(RuntimeError):
    """The tracking server cannot start, stop or be found; the message says why and what to do."""


@dataclass(frozen=True)
class TrackingServerSettings:
    """Where the server keeps its data and where it listens; the paths all lie inside ``directory``."""

    directory: Path = DEFAULT_DIR
    pg_port: int = DEFAULT_PG_PORT
    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    #: uvicorn workers of ``mlflow server``; None: MLflow's default (4)
    workers: int | None = None
    #: ``mlflow server --allowed-hosts`` (Host headers accepted besides localhost and private IPs), e.g. the
    #: server's DNS name when the team reaches it by name; None: MLflow's default
    allowed_hosts: str | None = None

    def __post_init__(self) -> None:
        # resolved once, so the folder stays the same whatever the working directory of later calls
        object.__setattr__(self, "directory", Path(self.directory).expanduser().resolve())
        for name in ("pg_port", "port"):
            value = getattr(self, name)
            if not 0 < value < 65536:
                raise TrackingServerError(f"{name}={value} is not a TCP port: give one in 1-65535")
        if self.pg_port == self.port:
            raise TrackingServerError(f"PostgreSQL and MLflow cannot share port {self.port}: give two ports")

    @property
    def data_dir(self) -> Path:
        return self.directory / "postgres"

    @property
    def cluster_initialised(self) -> bool:
        """Whether ``initdb`` has made the cluster (it writes ``PG_VERSION`` into the data folder)."""
        return (self.data_dir / "PG_VERSION").is_file()

    @property
    def socket_dir(self) -> Path:
        return self.directory / "socket"

    @property
    def postgres_log(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def mlflow_log(self) -> Path:
        return self.directory / "mlflow.log"

    @property
    def pid_file(self) -> Path:
        return self.directory / "mlflow.pid"

    @property
    def artifacts_dir(self) -> Path:
        return self.directory / "artifacts"

    @property
    def passfile(self) -> Path:
        return self.directory / "pgpass"


@dataclass(frozen=True)
class ServerStatus:
    """What runs in a tracking folder: PostgreSQL's port and the MLflow server's process and address."""

    initialised: bool
    postgres_port: int | None = None
    mlflow_pid: int | None = None
    tracking_uri: str | None = None

    @property
    def running(self) -> bool:
        return self.postgres_port is not None and self.mlflow_pid is not None


# ------------------------------------------------------------------------------------------ pure parts
def find_postgres_bin_dir(install_root: Path = POSTGRES_INSTALL_ROOT, search_path: str | None = None) -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``psql``: Debian's newest
    ``<install_root>/<version>/bin``, else the folder of the ``initdb`` on ``search_path`` (default:
    ``$PATH``).

    Raises:
        TrackingServerError: neither has them; the message says what to install.
    """
    versions = [folder for folder in install_root.glob("*/bin") if _has_postgres_binaries(folder)]
    if versions:
        return max(versions, key=lambda folder: _version_key(folder.parent.name))
    initdb = shutil.which("initdb", path=search_path)
    if initdb is not None:
        # PATH may hold a symlink (e.g. /usr/local/bin/initdb): its siblings are found beside its target
        folder = Path(initdb).resolve().parent
        if _has_postgres_binaries(folder):
            return folder
    raise TrackingServerError(f"PostgreSQL's server binaries (initdb, pg_ctl, psql) are neither in "
                              f"{install_root}/<version>/bin nor on PATH: {INSTALL_HINT}.")


def _has_postgres_binaries(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in POSTGRES_BINARIES)


def _version_key(name: str) -> tuple[int, ...]:
    # numeric order ("9.6" < "15"), not string order; a non-numeric folder sorts first
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (-1,)


#: bind addresses that are no address to connect to
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def backend_store_uri(pg_port: int, database: str = DATABASE) -> str:
    """The SQLAlchemy URI of ``database`` on the loopback cluster, without the password (libpq reads it from
    ``PGPASSFILE``), e.g. ``postgresql://mlflow@127.0.0.1:5433/mlflow``."""
    return f"postgresql://{ROLE}@127.0.0.1:{pg_port}/{database}"


def client_tracking_uri(host: str, port: int, hostname: str | None = None) -> str:
    """The URI clients export as ``MLFLOW_TRACKING_URI`` for a server bound to ``host``: a wildcard address
    (0.0.0.0, ::) is no address to connect to, so it becomes this machine's ``hostname``."""
    if host in WILDCARD_HOSTS:
        host = hostname or socket.gethostname()
    return f"http://{_url_host(host)}:{port}"


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:  # a name
        return host


def _probe_host(host: str) -> str:
    """Where this machine reaches a server bound to ``host`` (a wildcard answers on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def postgres_server_options(settings: TrackingServerSettings) -> str:
    """``pg_ctl start -o``'s string: port, loopback only, unix socket in the tracking folder. pg_ctl hands it
    to /bin/sh, hence the quoting of the folder."""
    return (f"-p {settings.pg_port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={shlex.quote(str(settings.socket_dir))}")


def mlflow_server_command(settings: TrackingServerSettings, python: str = sys.executable) -> list[str]:
    """``mlflow server`` on the PostgreSQL store, serving (proxying) artifacts from the tracking folder."""
    command = [python, "-m", "mlflow", "server",
               "--backend-store-uri", backend_store_uri(settings.pg_port),
               "--artifacts-destination", str(settings.artifacts_dir), "--serve-artifacts",
               "--host", settings.host, "--port", str(settings.port)]
    if settings.workers is not None:
        command += ["--workers", str(settings.workers)]
    allowed = allowed_hosts(settings)
    if allowed:
        command += ["--allowed-hosts", allowed]
    return command


def allowed_hosts(settings: TrackingServerSettings, hostname: str | None = None) -> str | None:
    """``--allowed-hosts``: the given ones, plus, for a wildcard bind, the host name that
    ``client_tracking_uri`` prints (MLflow 3 accepts only localhost and private IPs in a request's Host header by
    default, so the printed address would otherwise be refused)."""
    hosts = [host for host in (settings.allowed_hosts or "").split(",") if host]
    if settings.host in WILDCARD_HOSTS:
        name = hostname or socket.gethostname()
        hosts += [entry for entry in (name, f"{name}:{settings.port}") if entry not in hosts]
    return ",".join(hosts) or None


def setup_sql(password: str) -> str:
    """psql script creating the role and databases once (``\\gexec`` runs a CREATE only when it is missing)
    and setting the role's password to the passfile's (every start, so a recreated passfile still works)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", password):
        raise TrackingServerError("the generated PostgreSQL password must be URL-safe base64")
    lines = [f"SELECT 'CREATE ROLE {ROLE} LOGIN' WHERE NOT EXISTS "
             f"(SELECT FROM pg_roles WHERE rolname = '{ROLE}')\\gexec",
             # PostgreSQL < 14 would store an md5 hash, which scram-sha-256 host authentication refuses
             "SET password_encryption = 'scram-sha-256';",
             f"ALTER ROLE {ROLE} WITH LOGIN PASSWORD '{password}';"]
    for database in (DATABASE, OPTUNA_DATABASE):
        lines.append(f"SELECT 'CREATE DATABASE {database} OWNER {ROLE}' WHERE NOT EXISTS "
                     f"(SELECT FROM pg_database WHERE datname = '{database}')\\gexec")
    return "\n".join(lines) + "\n"


def ensure_passfile(path: Path) -> str:
    """The ``mlflow`` role's password from ``path`` (a libpq passfile), written with a new random password,
    readable by its owner only (libpq ignores a passfile others can read), when missing."""
    if path.is_file():
        for line in path.read_text().splitlines():
            fields = line.split(":")
            if len(fields) == 5 and fields[3] == ROLE:
                return fields[4]
        raise TrackingServerError(f"{path} has no line for the {ROLE} role: delete it and start again "
                                  "(a new password is generated)")
    password = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as passfile:
        passfile.write(f"127.0.0.1:*:*:{ROLE}:{password}\n")
    return password


def ensure_port_free(host: str, port: int, option: str) -> None:
    """Raise a clear error when ``host:port`` is taken, naming the option that chooses another port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # servers set SO_REUSEADDR too: a port whose last connection lingers in TIME_WAIT is free for them
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise TrackingServerError(f"port {port} on {host} is in use ({error.strerror}): stop what "
                                      f"listens there (ss -ltnp | grep :{port}) or choose another port with "
                                      f"{option}") from error


def log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``offset`` ("" when there are none)."""
    if not path.is_file():
        return ""
    with path.open("rb") as file:
        file.seek(offset)
        text = file.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _check_socket_path(settings: TrackingServerSettings) -> None:
    socket_path = settings.socket_dir / f".s.PGSQL.{settings.pg_port}"
    if len(os.fsencode(socket_path)) > MAX_UNIX_SOCKET_PATH:
        raise TrackingServerError(f"the PostgreSQL socket path {socket_path} is longer than the "
                                  f"{MAX_UNIX_SOCKET_PATH} bytes a unix socket allows: use a shorter --dir "
                                  "(TRACKING_DIR)")


# ------------------------------------------------------------------------------------------ PostgreSQL
def _cluster_user() -> str | None:
    """The system user to run PostgreSQL's binaries as: ``postgres`` for root (they refuse root), else None
    (the caller)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError as error:
        raise TrackingServerError(f"running as root, PostgreSQL must run as the '{POSTGRES_SYSTEM_USER}' "
                                  f"system user, which does not exist: {INSTALL_HINT} creates it") from error
    return POSTGRES_SYSTEM_USER


def _as_cluster_user(command: Sequence[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *command] if user else list(command)


def _run(command: Sequence[str], settings: TrackingServerSettings, user: str | None, stdin: str | None = None,
         log_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    full = _as_cluster_user(command, user)
    offset = log_file.stat().st_size if log_file is not None and log_file.is_file() else 0
    # cwd: the postgres user may not be allowed into the caller's working directory (/root)
    completed = subprocess.run(full, cwd=settings.directory, input=stdin, capture_output=True, text=True,
                               check=False)
    if completed.returncode != 0:
        details = (completed.stderr or completed.stdout).strip()
        if log_file is not None:
            details += f"\n--- {log_file} ---\n{log_tail(log_file, offset)}"
        raise TrackingServerError(f"{shlex.join(full)} failed with exit status {completed.returncode}:\n"
                                  f"{details}")
    return completed


def _give_to(paths: Sequence[Path], user: str | None) -> None:
    if user is not None:
        for path in paths:
            shutil.chown(path, user=user, group=pwd.getpwnam(user).pw_gid)


def _check_reachable(settings: TrackingServerSettings, user: str | None) -> None:
    """As root the cluster runs as ``postgres``, which must be able to enter every folder above the data."""
    if user is None:
        return
    probe = subprocess.run(_as_cluster_user(["test", "-w", str(settings.data_dir)], user), check=False)
    if probe.returncode != 0:
        blocking = next((folder for folder in reversed(settings.data_dir.parents)
                         if not os.stat(folder).st_mode & 0o001), settings.directory)
        raise TrackingServerError(f"the '{user}' user PostgreSQL runs as cannot reach {settings.data_dir}: "
                                  f"{blocking} is closed to other users. Allow it in (chmod o+x {blocking}) "
                                  "or choose a --dir (TRACKING_DIR) it can reach, e.g. under /var/tmp")


def _postgres_port(settings: TrackingServerSettings, bin_dir: Path, user: str | None) -> int | None:
    """The port of the cluster in ``settings.data_dir`` when it runs, else None."""
    if not settings.cluster_initialised:
        return None
    probe = subprocess.run(_as_cluster_user([str(bin_dir / "pg_ctl"), "status", "-D", str(settings.data_dir)],
                                            user), cwd=settings.directory, capture_output=True, check=False)
    if probe.returncode != 0:
        return None
    # postmaster.pid: pid, data directory, start time, port, ... (one per line)
    return int((settings.data_dir / "postmaster.pid").read_text().splitlines()[3])


def start_postgres(settings: TrackingServerSettings, bin_dir: Path | None = None) -> int:
    """Initialise (first use) and start the cluster, create the role and databases; returns its port."""
    _check_socket_path(settings)
    bin_dir = bin_dir or find_postgres_bin_dir()
    user = _cluster_user()
    settings.directory.mkdir(parents=True, exist_ok=True)
    settings.socket_dir.mkdir(mode=0o700, exist_ok=True)
    settings.postgres_log.touch()
    _give_to([settings.socket_dir, settings.postgres_log], user)
    if not settings.cluster_initialised:
        settings.data_dir.mkdir(mode=0o700, exist_ok=True)
        _give_to([settings.data_dir], user)
    _check_reachable(settings, user)
    if not settings.cluster_initialised:
        log.info("Initialising a PostgreSQL cluster in %s", settings.data_dir)
        _run([str(bin_dir / "initdb"), "-D", str(settings.data_dir), "--no-locale", "--encoding=UTF8",
              "--auth-local=peer", "--auth-host=scram-sha-256"], settings, user)
    running_port = _postgres_port(settings, bin_dir, user)
    if running_port is not None:
        log.info("PostgreSQL already runs on 127.0.0.1:%d (%s)", running_port, settings.data_dir)
        if running_port != settings.pg_port:
            log.warning("PostgreSQL keeps port %d, not the %d asked for: stop it first to change it",
                        running_port, settings.pg_port)
    else:
        ensure_port_free("127.0.0.1", settings.pg_port, "--pg-port (TRACKING_PG_PORT)")
        log.info("Starting PostgreSQL on 127.0.0.1:%d (log: %s)", settings.pg_port, settings.postgres_log)
        _run([str(bin_dir / "pg_ctl"), "start", "-D", str(settings.data_dir), "-l",
              str(settings.postgres_log), "-w", "-t", str(POSTGRES_START_TIMEOUT_S),
              "-o", postgres_server_options(settings)], settings, user, log_file=settings.postgres_log)
        running_port = settings.pg_port
    password = ensure_passfile(settings.passfile)
    _run([str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(settings.socket_dir),
          "-p", str(running_port), "-d", "postgres"], settings, user, stdin=setup_sql(password))
    return running_port


def stop_postgres(settings: TrackingServerSettings, bin_dir: Path | None = None) -> bool:
    """``pg_ctl stop -m fast`` (open connections are closed); False when it was not running."""
    if not settings.cluster_initialised:
        return False
    bin_dir = bin_dir or find_postgres_bin_dir()
    user = _cluster_user()
    if _postgres_port(settings, bin_dir, user) is None:
        return False
    _run([str(bin_dir / "pg_ctl"), "stop", "-D", str(settings.data_dir), "-m", "fast", "-w"], settings, user)
    return True


# ------------------------------------------------------------------------------------------ MLflow server
def _read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(part) for part in raw.split(b"\0") if part]


def _option(command: Sequence[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command[:-1] else None


def _served_uri(command: Sequence[str]) -> str:
    """The client URI of a running server, from its own command line."""
    return client_tracking_uri(_option(command, "--host") or DEFAULT_HOST,
                               int(_option(command, "--port") or DEFAULT_PORT))


def _mlflow_process(settings: TrackingServerSettings) -> tuple[int, list[str]] | None:
    """(pid, command line) of this folder's MLflow server, None when the pid file is missing or stale (no
    process, or another one that reuses the pid: it must be `mlflow server` with this folder's artifacts)."""
    try:
        pid = int(settings.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    command = _read_cmdline(pid)
    if "server" in command and _option(command, "--artifacts-destination") == str(settings.artifacts_dir):
        return pid, command
    return None


def _alive(pid: int) -> bool:
    try:
        # reaps the server if this process started it (the e2e test does), since a zombie still "exists"
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def wait_until_healthy(url: str, process: subprocess.Popen[bytes] | None, log_file: Path, log_offset: int,
                       timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Poll ``<url>/health`` until it answers OK.

    Raises:
        TrackingServerError: the process exited or the timeout passed; the message holds its log's tail.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise TrackingServerError(f"mlflow server exited with status {process.returncode} before "
                                      f"answering on {url}; the end of {log_file}:\n"
                                      f"{log_tail(log_file, log_offset)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet, or an HTTP error status (HTTPError is an OSError)
            pass
        if time.monotonic() > deadline:
            raise TrackingServerError(f"mlflow server did not answer on {url}/health within {timeout_s:.0f} "
                                      f"s; the end of {log_file}:\n{log_tail(log_file, log_offset)}")
        time.sleep(1.0)


def _terminate(pid: int) -> None:
    """SIGTERM to the server's process group (uvicorn workers included), SIGKILL if it lingers."""
    group = os.getpgid(pid)
    kill = os.killpg if group == pid else os.kill  # started in a session of its own: pgid == pid
    kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            log.warning("mlflow server (pid %d) ignored SIGTERM for %.0f s: killing it", pid, STOP_TIMEOUT_S)
            kill(pid, signal.SIGKILL)
            break
        time.sleep(0.2)


def start_mlflow(settings: TrackingServerSettings,
                 timeout_s: float = SERVER_START_TIMEOUT_S) -> tuple[int, str]:
    """Start ``mlflow server`` in the background (log and pid file in the tracking folder) and wait for it;
    returns (pid, tracking URI). A server already running from this folder is kept."""
    found = _mlflow_process(settings)
    if found is not None:
        pid, command = found
        uri = _served_uri(command)
        log.info("mlflow server already runs at %s (pid %d)", uri, pid)
        if _option(command, "--port") != str(settings.port) or _option(command, "--host") != settings.host:
            log.warning("It keeps its address, not %s:%d: stop it first to change it", settings.host,
                        settings.port)
        return pid, uri
    ensure_port_free(settings.host, settings.port, "--port (TRACKING_PORT)")
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    offset = settings.mlflow_log.stat().st_size if settings.mlflow_log.is_file() else 0
    env = os.environ | {"PGPASSFILE": str(settings.passfile)}
    with settings.mlflow_log.open("ab") as log_file:
        log_file.write(f"--- mlflow server starting {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        log_file.flush()
        # a session of its own: it outlives this command, and stop signals its whole process group
        process = subprocess.Popen(mlflow_server_command(settings), cwd=settings.directory, env=env,
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    settings.pid_file.write_text(f"{process.pid}\n")
    uri = client_tracking_uri(settings.host, settings.port)
    log.info("Starting mlflow server (pid %d, log: %s)", process.pid, settings.mlflow_log)
    try:
        wait_until_healthy(f"http://{_url_host(_probe_host(settings.host))}:{settings.port}", process,
                           settings.mlflow_log, offset, timeout_s)
    except TrackingServerError:
        if process.poll() is None:
            _terminate(process.pid)
        settings.pid_file.unlink(missing_ok=True)
        raise
    return process.pid, uri


def stop_mlflow(settings: TrackingServerSettings) -> bool:
    """Stop this folder's MLflow server; False when none was running."""
    found = _mlflow_process(settings)
    settings.pid_file.unlink(missing_ok=True)
    if found is None:
        return False
    _terminate(found[0])
    return True


# ------------------------------------------------------------------------------------------ both
def start(settings: TrackingServerSettings, timeout_s: float = SERVER_START_TIMEOUT_S) -> ServerStatus:
    """PostgreSQL, then the MLflow server on it; what already runs is kept. Returns what runs now."""
    bin_dir = find_postgres_bin_dir()
    pg_port = start_postgres(settings, bin_dir)
    try:
        # a cluster already running keeps its port, which MLflow must use whatever was asked for now
        pid, uri = start_mlflow(dataclasses.replace(settings, pg_port=pg_port), timeout_s)
    except TrackingServerError as error:
        raise TrackingServerError(f"{error}\n(PostgreSQL keeps running on 127.0.0.1:{pg_port}: stop stops "
                                  "it, start tries the MLflow server again)") from error
    return ServerStatus(initialised=True, postgres_port=pg_port, mlflow_pid=pid, tracking_uri=uri)


def stop(settings: TrackingServerSettings) -> ServerStatus:
    """The MLflow server, then PostgreSQL (fast shutdown); either may already be stopped."""
    log.info("mlflow server: %s", "stopped" if stop_mlflow(settings) else "was not running")
    log.info("PostgreSQL: %s", "stopped" if stop_postgres(settings) else "was not running")
    return status(settings)


def status(settings: TrackingServerSettings) -> ServerStatus:
    initialised = settings.cluster_initialised
    pg_port = _postgres_port(settings, find_postgres_bin_dir(), _cluster_user()) if initialised else None
    found = _mlflow_process(settings)
    if found is None:
        return ServerStatus(initialised, pg_port)
    pid, command = found
    return ServerStatus(initialised, pg_port, pid, _served_uri(command))


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.tracking_server",
                                     description="A shared MLflow tracking server backed by PostgreSQL.")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"folder of the cluster, artifacts, logs and pid file (default: {DEFAULT_DIR}/)")
    parser.add_argument("--pg-port", type=int, default=DEFAULT_PG_PORT,
                        help=f"PostgreSQL's port, on 127.0.0.1 only (default: {DEFAULT_PG_PORT})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"the MLflow server's port (default: {DEFAULT_PORT})")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"the MLflow server's address (default: {DEFAULT_HOST}; 0.0.0.0 for a team, "
                             "behind a firewall or reverse proxy)")
    parser.add_argument("--workers", type=int, default=None, help="uvicorn workers (default: MLflow's, 4)")
    parser.add_argument("--allowed-hosts", default=None,
                        help="Host headers the server accepts besides localhost and private IPs, e.g. its "
                             "DNS name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done (``status``: both servers run), 1 an error (on stderr), 3 ``status``: not
    running."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        settings = TrackingServerSettings(args.dir, pg_port=args.pg_port, port=args.port, host=args.host,
                                          workers=args.workers, allowed_hosts=args.allowed_hosts)
        if args.command == "start":
            state = start(settings)
            log.info("MLflow tracking server (UI and REST API) at %s; PostgreSQL on 127.0.0.1:%d; data in %s",
                     state.tracking_uri, state.postgres_port, settings.directory)
            # stdout holds only this line, so `eval "$(python -m experiments.tracking_server start)"` works
            print(f"export MLFLOW_TRACKING_URI={state.tracking_uri}")
            return 0
        if args.command == "stop":
            stop(settings)
            return 0
        state = status(settings)
    except TrackingServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not state.initialised:
        postgres = f"no cluster in {settings.data_dir} yet (start creates it)"
    elif state.postgres_port is None:
        postgres = f"stopped ({settings.data_dir})"
    else:
        postgres = f"running on 127.0.0.1:{state.postgres_port} ({settings.data_dir})"
    mlflow = ("stopped" if state.mlflow_pid is None
              else f"running at {state.tracking_uri} (pid {state.mlflow_pid})")
    print(f"PostgreSQL: {postgres}")
    print(f"mlflow server: {mlflow}")
    return 0 if state.running else 3


if __name__ == "__main__":
    sys.exit(main())
