"""The guides in ``docs/`` against the code: they must not rot.

* Every ``radfed …`` command in a shell block (and in inline code) exists in the
  real Typer/Click CLI with the options and arguments it is given (file:line).
* Every ``RADFED_…`` variable, settings table row (name and default), TOML
  example and de-identification option named exists and loads.
* The walkthrough runs: the blocks marked ``{test=N}`` are executed in the order
  of N across the guides, in one bash session (exports, variables and the working
  directory carry over, as in a terminal), on temporary homes and free ports. A
  ``{serve=…}`` block starts that server in the background through the test
  helpers; a ``{write=PATH}`` block is written to PATH; ``rc=N`` expects that exit
  status; a ``text {expect}`` block after a runnable one lists lines its output
  must contain (``…`` matches anything).
* The Prometheus metrics the guides list are exactly the ``radfed_*`` metrics the
  running services expose.

A real site's values in runnable blocks are replaced by the test's
(``substitutions``), and ``<placeholders>`` are filled from ``PLACEHOLDERS``;
anything else stays as written. One coordinator and one node serve the whole module.
Settings the test adds are for speed only: no Flower SuperLink (no training runs
here), uploads scanned in the coordinator's process, ingest on one worker.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import typer
from pydantic import BaseModel

from coordinator.settings import CoordinatorSettings
from coordinator.settings import load_settings as load_coordinator_settings
from node.settings import NodeSettings
from node.settings import load_settings as load_node_settings
from node.training.policy import TrainingPolicy
from node.vetting.policy import VettingPolicy
from protocols.deid.options import DeidOptions
from radfed.cli import app as radfed_app
from tests.helpers import ROOT, CoordinatorProcess, NodeProcess, run_cli

pytestmark = pytest.mark.integration

DOCS = ROOT / "docs"
GUIDES = sorted(DOCS.glob("*.md"))
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)\s*(?:\{(?P<attrs>[^}]*)\})?\s*$")
PLACEHOLDER = re.compile(r"<([a-z][a-z0-9-]*)>")
OPERATORS = set("();<>|&")
BLOCK_TIMEOUT = 120.0


# ---- reading the guides --------------------------------------------------------------


@dataclass
class Block:
    """A fenced block: where it is, its language, its ``{key=value …}`` attributes."""

    doc: Path
    line: int  # of the opening fence
    lang: str
    attrs: dict[str, str]
    text: str
    expect: Block | None = None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def step(self) -> int | None:
        return int(self.attrs["test"]) if "test" in self.attrs else None


def blocks(doc: Path) -> list[Block]:
    """Every fenced block of a guide; an ``{expect}`` block is attached to the runnable
    block before it."""
    found: list[Block] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i].strip())
        if not match or not match["fence"]:
            i += 1
            continue
        fence, start = match["fence"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i])
            i += 1
        indent = len(lines[start]) - len(lines[start].lstrip())
        text = "\n".join(line[indent:] if line[:indent].isspace() else line for line in body)
        attrs = dict(
            item.partition("=")[::2] for item in (match["attrs"] or "").split() if item.strip()
        )
        block = Block(doc, start + 1, match["lang"], attrs, text)
        if "expect" in attrs:
            runnable = found[-1] if found else None
            assert runnable is not None and runnable.step is not None, (
                f"{block.where}: an expect block must follow a runnable block"
            )
            runnable.expect = block
        found.append(block)
        i += 1
    return found


@cache
def all_blocks() -> tuple[Block, ...]:
    return tuple(b for doc in GUIDES for b in blocks(doc))


def section(doc: Path, marker: str) -> str:
    """The text after ``<!-- marker -->`` up to the next heading or marker."""
    text = doc.read_text(encoding="utf-8")
    start = text.index(f"<!-- {marker} -->") + len(marker) + 9
    end = re.search(r"^(#|<!--)", text[start:], re.MULTILINE)
    return text[start : start + end.start()] if end else text[start:]


def markers(kind: str) -> Iterator[tuple[Path, str, str]]:
    """``(doc, argument, section text)`` for each ``<!-- kind: argument -->``."""
    for doc in GUIDES:
        for name in re.findall(rf"<!-- {kind}: ([\w.]+) -->", doc.read_text(encoding="utf-8")):
            yield doc, name, section(doc, f"{kind}: {name}")


def inline_code(doc: Path) -> Iterator[tuple[int, str]]:
    """Inline code spans outside fenced blocks, with their line."""
    text = doc.read_text(encoding="utf-8")
    fenced = re.compile(r"^\s*(```|~~~).*?^\s*\1\s*$", re.MULTILINE | re.DOTALL)
    prose = fenced.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for match in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose):
        yield prose.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split())


# ---- the CLI -------------------------------------------------------------------------


@cache
def cli() -> click.Group:
    command = typer.main.get_command(radfed_app)
    assert isinstance(command, click.Group)
    return command


def _options(command: click.Command) -> dict[str, click.Option]:
    names = {
        name: p
        for p in command.params
        if isinstance(p, click.Option)
        for name in (*p.opts, *p.secondary_opts)
    }
    names["--help"] = click.Option(["--help"], is_flag=True)
    return names


def _literal(value: str) -> bool:
    """A value written out in full (not a variable, placeholder or ellipsis)."""
    return not any(mark in value for mark in ("$", "…", "PLACEHOLDER", "VALUE"))


def check_invocation(args: list[str], strict: bool = True) -> list[str]:
    """Problems of ``radfed ARGS`` against the real CLI (empty: it is a valid command).

    ``strict``: the command line is complete (required arguments and options given).
    """
    command: click.Command = cli()
    path = ["radfed"]
    i = 0
    while isinstance(command, click.Group):
        options = _options(command)
        while i < len(args) and args[i].startswith("-"):
            name, eq, _ = args[i].partition("=")
            if name not in options:
                return [f"`{' '.join(path)}` has no option {name}"]
            takes_value = not (options[name].is_flag or options[name].count)
            i += 2 if takes_value and not eq else 1
        if i == len(args):
            return []  # a group alone shows its help
        sub = command.commands.get(args[i]) if isinstance(command, click.Group) else None
        if sub is None:
            return [f"`{' '.join(path)}` has no command {args[i]!r}"]
        path.append(args[i])
        command = sub
        i += 1
    problems: list[str] = []
    options = _options(command)
    given: set[str] = set()
    positional: list[str] = []
    while i < len(args):
        token = args[i]
        i += 1
        if token.startswith("-") and token != "-":
            name, eq, value = token.partition("=")
            option = options.get(name)
            if option is None:
                problems.append(f"`{' '.join(path)}` has no option {name}")
                continue
            given.add(option.name or name)
            if option.is_flag or option.count:
                continue
            if not eq:
                if i >= len(args):
                    if strict:  # prose may name an option without its value
                        problems.append(f"`{' '.join(path)}` option {name} needs a value")
                    continue
                value, i = args[i], i + 1
            if _literal(value):
                try:
                    option.type.convert(value, option, None)
                except click.BadParameter as exc:
                    problems.append(f"`{' '.join(path)}` {name} {value!r}: {exc.message}")
        else:
            positional.append(token)
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    unlimited = any(p.nargs < 0 for p in arguments)
    if not unlimited and len(positional) > sum(p.nargs for p in arguments):
        problems.append(f"`{' '.join(path)}` takes no argument {positional[-1]!r}")
    if strict:
        needed = sum(max(p.nargs, 1) for p in arguments if p.required)
        if len(positional) < needed:
            names = ", ".join(p.human_readable_name for p in arguments)
            problems.append(f"`{' '.join(path)}` needs its arguments ({names})")
        for option in {id(o): o for o in options.values()}.values():
            if option.required and option.name not in given and not option.envvar:
                problems.append(f"`{' '.join(path)}` needs {option.opts[0]}")
    return problems


def _tokens(text: str) -> list[str]:
    text = PLACEHOLDER.sub("PLACEHOLDER", text)
    text = re.sub(r"\$\([^()]*\)", "VALUE", text)
    text = re.sub(r"<<-?\s*['\"]?\w+['\"]?", " ", text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def radfed_commands(tokens: list[str]) -> Iterator[list[str]]:
    """The arguments of each ``radfed`` command in a shell command line."""
    for i, token in enumerate(tokens):
        if token != "radfed" and not token.endswith("/bin/radfed"):
            continue
        args: list[str] = []
        for j in range(i + 1, len(tokens)):
            word = tokens[j]
            redirect = word.isdigit() and j + 1 < len(tokens) and tokens[j + 1][:1] in "<>"
            if set(word) <= OPERATORS or redirect:
                break
            args.append(word)
        yield args


def command_lines(block: Block) -> Iterator[tuple[int, str]]:
    """Logical command lines of a shell block (continuations joined, heredocs skipped)."""
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i]
        i += 1
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", text)
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1
        if block.lang in SHELL:
            yield block.line + 1 + start, text
        elif text.startswith("ExecStart="):
            yield block.line + 1 + start, text.removeprefix("ExecStart=")


def test_every_radfed_command_in_the_guides_is_a_real_command_line() -> None:
    # Prepare
    checked = 0
    problems: list[str] = []

    # Execute: every shell block (and systemd ExecStart line), then inline code
    for block in all_blocks():
        for line, text in command_lines(block):
            for args in radfed_commands(_tokens(text)):
                checked += 1
                problems += [f"{block.doc.name}:{line}: {p}" for p in check_invocation(args)]
    for doc in GUIDES:
        for line, code in inline_code(doc):
            if code.startswith("radfed ") and "|" not in code:
                for args in radfed_commands(_tokens(code)):
                    checked += 1
                    found = check_invocation(args, strict=False)
                    problems += [f"{doc.name}:{line}: {p}" for p in found]

    # Assert
    assert checked > 50, f"only {checked} radfed commands found in {DOCS}"
    assert not problems, "\n".join(problems)


def test_the_command_checker_catches_what_rots() -> None:
    # Prepare / Execute / Assert: the checker itself, on commands that do not exist
    assert check_invocation(["node", "ingest", "/data", "--no-vet", "-j", "2"]) == []
    assert check_invocation(["train", "submit", "--secagg", "--dp-clip", "1"]) == []
    assert check_invocation(["node", "ingest", "/data", "--bogus"])
    assert check_invocation(["node", "nope"])
    assert check_invocation(["node", "enroll", "URL", "TOKEN", "extra"])
    assert check_invocation(["node", "enroll", "URL"])  # the token is missing
    assert check_invocation(["node", "serve", "--api-port", "eighty"])
    assert check_invocation(["node", "quarantine", "source", "1"])  # --reason is required
    assert check_invocation(["node", "enroll"], strict=False) == []


# ---- settings, variables, configuration examples --------------------------------------


def _field(model: type[BaseModel], dotted: str) -> Any:
    """The pydantic field ``a.b`` of ``model`` (nested models followed), or None."""
    head, _, rest = dotted.partition(".")
    info = model.model_fields.get(head)
    if info is None or not rest:
        return info
    nested = info.annotation
    return (
        _field(nested, rest) if isinstance(nested, type) and issubclass(nested, BaseModel) else None
    )


SETTINGS: dict[str, type[BaseModel]] = {
    "node": NodeSettings,
    "coordinator": CoordinatorSettings,
    "node.deid": DeidOptions,
}


def test_every_setting_and_variable_the_guides_name_exists(tmp_path: Path) -> None:
    # Prepare
    envvars = {
        envvar
        for command in _walk(cli())
        for p in command.params
        for envvar in ([p.envvar] if isinstance(p.envvar, str) else p.envvar or [])
    }
    problems: list[str] = []
    rows = 0

    # Execute
    for doc in GUIDES:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"RADFED_[A-Z0-9_]*", text):
            var, line = match.group(0), text.count("\n", 0, match.start()) + 1
            if var.endswith("_"):
                continue  # a prefix: RADFED_NODE_<NAME>
            for prefix, model in (
                ("RADFED_NODE_", NodeSettings),
                ("RADFED_COORDINATOR_", CoordinatorSettings),
            ):
                if var.startswith(prefix):
                    key = var.removeprefix(prefix).lower().replace("__", ".")
                    if _field(model, key) is None:
                        problems.append(f"{doc.name}:{line}: {var} names no {model.__name__} field")
                    break
            else:
                if var not in envvars:
                    problems.append(f"{doc.name}:{line}: no setting or CLI option reads {var}")
        for match in re.finditer(r"(?<![\w/.-])((?:retain|clean)-[a-z-]*[a-z])\b", text):
            if match.group(1).replace("-", "_") not in DeidOptions.model_fields:
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{doc.name}:{line}: no de-identification option {match.group(1)}")
        for line, code in inline_code(doc):
            assignment = re.fullmatch(r"([a-z][a-z0-9_]*) = (.+)", code)
            if assignment:
                problems += _load(doc, line, assignment.group(0), tmp_path)
    for doc, name, table in markers("settings"):
        model = SETTINGS[name]
        for row in re.findall(r"^\| `([a-z0-9_]+)` \| ([^|]+) \|", table, re.MULTILINE):
            rows += 1
            problems += _default(doc, name, model, *row)

    # Assert
    assert rows > 30, "the settings tables were not found"
    assert not problems, "\n".join(problems)


def _walk(command: click.Command) -> Iterator[click.Command]:
    yield command
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _walk(sub)


def _default(doc: Path, name: str, model: type[BaseModel], key: str, cell: str) -> list[str]:
    """A settings table row: the setting exists; a default written as TOML is the real one."""
    info = model.model_fields.get(key)
    if info is None:
        return [f"{doc.name}: {key} is not a {name} setting"]
    actual = info.get_default(call_default_factory=True)
    cell = cell.strip()
    if cell.startswith("none"):
        return [] if actual is None else [f"{doc.name}: {key} defaults to {actual!r}, not none"]
    literal = re.fullmatch(r"`([^`]+)`", cell)
    if not literal:
        return []  # described in words
    documented = tomllib.loads(f"value = {literal.group(1)}")["value"]
    if documented != actual:
        return [f"{doc.name}: {key} defaults to {actual!r}, the table says {documented!r}"]
    return []


def _load(doc: Path, line: int, toml: str, tmp_path: Path, kind: str = "") -> list[str]:
    """Problems of a TOML example: the settings or policy it is must accept it whole."""
    try:
        data = tomllib.loads(toml)
    except tomllib.TOMLDecodeError as exc:
        return [f"{doc.name}:{line}: not TOML: {exc}"]
    kinds = (
        [kind]
        if kind
        else [k for k in ("node", "coordinator") if set(data) <= set(SETTINGS[k].model_fields)]
    )
    if not kinds:
        return [f"{doc.name}:{line}: {', '.join(data)}: not a node or coordinator setting"]
    problems = []
    for kind in kinds:
        try:
            if kind == "node":
                load_node_settings(tmp_path / "node-home", **data)
            elif kind == "coordinator":
                load_coordinator_settings(tmp_path / "coordinator-home", **data)
            elif kind == "vetting":
                VettingPolicy.model_validate(data)
            else:
                TrainingPolicy.model_validate(data)
        except ValueError as exc:
            problems.append(f"{doc.name}:{line}: the {kind} settings or policy refuse it: {exc}")
    return problems


def test_every_configuration_example_in_the_guides_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: settings from the environment must not help an example load
    for name in list(os.environ):
        if name.startswith("RADFED_"):
            monkeypatch.delenv(name)
    problems: list[str] = []
    toml_blocks = [b for b in all_blocks() if b.lang == "toml"]

    # Execute
    for block in toml_blocks:
        kind = block.attrs.get("settings") or block.attrs.get("policy")
        if kind is None:
            problems.append(f"{block.where}: say which file this is (settings= or policy=)")
            continue
        problems += _load(block.doc, block.line, block.text, tmp_path, kind)

    # Assert
    assert len(toml_blocks) >= 4
    assert not problems, "\n".join(problems)


def test_the_guides_link_to_each_other_and_their_anchors_exist() -> None:
    # Prepare
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    problems = [
        f"docs/README.md does not link {g.name}"
        for g in GUIDES
        if g.name != "README.md" and f"({g.name})" not in index
    ]
    if "docs/README.md" not in (ROOT / "README.md").read_text(encoding="utf-8"):
        problems.append("README.md does not point at docs/README.md")

    # Execute: every relative link resolves, anchors included (GitHub's slugs)
    for doc in GUIDES:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                problems.append(f"{doc.name}: {target}: no such file")
            elif anchor and anchor not in _anchors(file):
                problems.append(f"{doc.name}: {target}: no such heading")

    # Assert
    assert not problems, "\n".join(problems)


def _anchors(doc: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", doc.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


# ---- the walkthrough ------------------------------------------------------------------


class Shell:
    """One bash session, as a person types the guides' blocks into a terminal."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.dir = cwd.parent / "blocks"
        self.dir.mkdir()
        self.count = 0
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "shell.log").open("w"),
            text=True,
            cwd=cwd,
            env=env,
        )
        self._send("set -euo pipefail")

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def run(self, text: str, where: str, rc: int = 0) -> tuple[str, dict[str, str]]:
        """Run a block; its output (stdout and stderr) and the environment after it."""
        self.count += 1
        n = self.count
        script, out, done = (self.dir / f"{n}.{ext}" for ext in ("sh", "out", "done"))
        env, status = self.dir / f"{n}.env", self.dir / f"{n}.rc"
        script.write_text(text + "\n", encoding="utf-8")
        q = shlex.quote
        if rc == 0:
            self._send(f". {q(str(script))} < /dev/null > {q(str(out))} 2>&1")
        else:
            self._send(
                f"set +e; ( . {q(str(script))} ) < /dev/null > {q(str(out))} 2>&1; "
                f"echo $? > {q(str(status))}; set -e"
            )
        self._send(f"env -0 > {q(str(env))}; : > {q(str(done))}")
        deadline = time.monotonic() + BLOCK_TIMEOUT
        while not done.exists():
            output = out.read_text(errors="replace") if out.exists() else ""
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{where}: the block failed (exit {self.proc.returncode}):\n{text}\n"
                    f"--- output:\n{output}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{where}: the block ran over {BLOCK_TIMEOUT:g} s:\n{output}")
            time.sleep(0.05)
        output = out.read_text(errors="replace")
        if rc:
            got = int(status.read_text())
            assert got == rc, f"{where}: exit status {got}, the guide says {rc}:\n{output}"
        pairs = (item.partition("=") for item in env.read_text().split("\0") if item)
        return output, {k: v for k, _, v in pairs}

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Walkthrough:
    """What the runnable blocks did, and the services they left running."""

    work: Path
    node_home: Path
    coordinator_home: Path
    coordinator: CoordinatorProcess
    node: NodeProcess
    outputs: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)


def _normal(line: str) -> str:
    return " ".join(line.split())


def missing_lines(expect: str, output: str) -> list[str]:
    """Lines of an expect block that no output line matches (``…``: anything)."""
    lines = [_normal(line) for line in output.splitlines()]
    missing = []
    for want in expect.splitlines():
        if not want.strip():
            continue
        pattern = ".*?".join(re.escape(part) for part in _normal(want).split("…"))
        if not any(re.search(pattern, line) for line in lines):
            missing.append(want)
    return missing


def _held_study(run: Walkthrough) -> str:
    token = run.env.get("NODE_TOKEN")
    assert token, "<study-uid>: the guide has not exported NODE_TOKEN yet"
    answer = httpx.get(
        f"{run.node.url}/api/v1/studies",
        params={"status": "held", "modality": "CT", "burned_in_risk": "false"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    answer.raise_for_status()
    items = answer.json()["items"]
    assert items, f"<study-uid>: no CT study is held for review: {answer.text}"
    return str(items[0]["study_instance_uid"])


def _app_hash(_: Walkthrough) -> str:
    from coordinator.training import fab_hash

    return fab_hash(ROOT / "apps" / "cxr")


PLACEHOLDERS: dict[str, Callable[[Walkthrough], str]] = {
    "study-uid": _held_study,
    "app-sha256": _app_hash,
}


def substitutions(run: Walkthrough, corpus: Path) -> list[tuple[str, str]]:
    """A real site's values in the guides -> this test's."""
    return [
        ("https://coordinator.example.org:8443", run.coordinator.url),
        ("http://127.0.0.1:8080", run.node.url),
        ("127.0.0.1 11112", f"127.0.0.1 {run.node.dicom_port}"),
        ("/var/lib/radfed/node", str(run.node_home)),
        ("/var/lib/radfed/coordinator", str(run.coordinator_home)),
        ("/srv/pacs-export", str(corpus)),
    ]


def _serve(block: Block, run: Walkthrough, env: dict[str, str]) -> None:
    """Start the server a ``serve=`` block names, in the background, as it is written."""
    kind = block.attrs["serve"]
    commands = [args for _, text in command_lines(block) for args in radfed_commands(_tokens(text))]
    assert commands and commands[0][:2] == [kind, "serve"], (
        f"{block.where}: not `radfed {kind} serve`"
    )
    process = run.coordinator if kind == "coordinator" else run.node
    home = run.coordinator_home if kind == "coordinator" else run.node_home
    assert env.get(f"RADFED_{kind.upper()}_HOME") == str(home), f"{block.where}: which home?"
    process.env = {**env, **process.env}  # the session's settings, the helper's test ports
    process.start(timeout=90)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walkthrough]:
    from radfed.synth.site import write_site_corpus

    base = tmp_path_factory.mktemp("docs")
    work = base / "work"
    work.mkdir()
    corpus = base / "pacs-export"
    write_site_corpus(corpus, patients=2, ct_slices=4, ct_size=64, cr_size=128)
    node_home, coordinator_home = base / "node-home", base / "coordinator-home"
    run = Walkthrough(
        work,
        node_home,
        coordinator_home,
        # Speed, not behaviour: uploads scanned in the server process, ingest on one core
        # (a pool costs more than 13 files), no Flower SuperLink (no training here).
        CoordinatorProcess(coordinator_home, {"RADFED_COORDINATOR_SCAN_WORKERS": "1"}),
        NodeProcess(node_home),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADFED_")}
    env.update(
        HOME=str(base / "home"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        COLUMNS="200",
        RADFED_NODE_INGEST_JOBS="1",
        RADFED_NODE_HOME=str(node_home),
        RADFED_COORDINATOR_HOME=str(coordinator_home),
    )
    (base / "home").mkdir()
    run.env = env
    shell = Shell(work, env)
    swap = substitutions(run, corpus)

    def real(text: str) -> str:
        for mine, theirs in swap:
            text = text.replace(mine, theirs)
        return text

    steps = sorted((b for b in all_blocks() if b.step is not None), key=lambda b: b.step or 0)
    try:
        for block in steps:
            if "serve" in block.attrs:
                _serve(block, run, run.env)
                output = ""
            elif "write" in block.attrs:
                target = Path(real(block.attrs["write"]))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(real(block.text) + "\n", encoding="utf-8")
                output = ""
            else:
                assert block.lang in SHELL, f"{block.where}: only shell blocks run"
                text = PLACEHOLDER.sub(lambda m: PLACEHOLDERS[m.group(1)](run), real(block.text))
                output, run.env = shell.run(text, block.where, int(block.attrs.get("rc", 0)))
            run.outputs[block.where] = output
            run.ran.append(block.where)
            if block.expect is not None:
                missing = missing_lines(real(block.expect.text), output)
                assert not missing, (
                    f"{block.expect.where}: the output of {block.where} lacks "
                    + "\n".join(missing)
                    + f"\n--- output:\n{output}"
                )
        yield run
    finally:
        shell.close()
        running = [p for p in (run.node, run.coordinator) if p.proc and p.proc.poll() is None]
        for process in running:  # both at once: each takes seconds to stop cleanly
            assert process.proc is not None
            process.proc.terminate()
        for process in running:
            try:
                process.stop()
            except AssertionError:
                process.kill()


def test_the_steps_are_numbered_once_and_fill_every_placeholder() -> None:
    # Prepare
    steps = [b for b in all_blocks() if b.step is not None]
    numbers = [b.step for b in steps]

    # Execute
    unknown = [
        f"{b.where}: <{name}>"
        for b in steps
        for name in PLACEHOLDER.findall(b.text)
        if name not in PLACEHOLDERS
    ]

    # Assert
    assert len(numbers) == len(set(numbers)), f"a step number is used twice: {sorted(numbers)}"
    assert not unknown, f"placeholders the test cannot fill: {unknown}"
    assert {b.doc.name for b in steps} >= {
        "hospital-it.md",
        "coordinator-operator.md",
        "researcher.md",
    }


def test_the_guides_walkthroughs_run_on_a_fresh_federation(walkthrough: Walkthrough) -> None:
    # Prepare / Execute: the fixture ran every runnable block in order

    # Assert: the flow got where the guides say it gets
    runnable = [b.where for b in sorted(all_blocks(), key=lambda b: b.step or 0) if b.step]
    assert walkthrough.ran == runnable
    assert (walkthrough.node_home / "keys" / "federation" / "node.crt").exists()
    assert (walkthrough.coordinator_home / "releases" / "v1.0" / "manifest.json").exists()


def test_the_backup_in_the_guide_restores_the_keys_and_the_map(walkthrough: Walkthrough) -> None:
    from node.deid.keys import vault_key
    from node.deid.vault import Vault

    # Prepare
    restored = walkthrough.work / "restore-check"
    secrets = ["keys/site.secret", "keys/vault.key", "keys/federation/node.key"]

    # Execute
    modes = {
        name: stat.S_IMODE((restored / name).stat().st_mode)
        for name in [*secrets, "vault/originals.vault"]
    }
    entries = list(
        Vault(restored / "vault" / "originals.vault", vault_key(restored / "keys")).entries()
    )

    # Assert: private files, the same secrets, a map that opens with the restored key
    assert modes == dict.fromkeys(modes, 0o600), modes
    for name in secrets:
        assert (restored / name).read_bytes() == (walkthrough.node_home / name).read_bytes()
    assert entries, "the restored vault holds no entries"


def _families(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        f.name
        for f in text_string_to_metric_families(text)
        if f.name.startswith("radfed_") and not f.name.endswith("_created")
    }


def _documented(name: str, family: str) -> bool:
    return name in (family, *(family + s for s in ("_total", "_bucket", "_sum", "_count")))


def test_the_metrics_the_guides_list_are_those_the_services_expose(
    walkthrough: Walkthrough,
) -> None:
    # Prepare
    documented: dict[str, set[str]] = {}
    for _, service, text in markers("metrics"):
        documented.setdefault(service, set()).update(re.findall(r"\bradfed_[a-z0-9_]+", text))
    node = httpx.get(f"{walkthrough.node.url}/metrics", timeout=30)
    operator = run_cli(
        "coordinator",
        "token",
        "create",
        "metrics-check",
        "--role",
        "operator",
        "--home",
        str(walkthrough.coordinator_home),
        check=True,
    ).stdout.strip()
    coordinator = httpx.get(
        f"{walkthrough.coordinator.url}/metrics",
        headers={"Authorization": f"Bearer {operator}"},
        timeout=30,
        verify=walkthrough.coordinator.tls(),
    )

    # Execute
    exposed = {"node": _families(node.text), "coordinator": _families(coordinator.text)}

    # Assert: each service's list is complete and names nothing it lacks
    assert set(documented) == set(exposed), f"metrics sections: {sorted(documented)}"
    assert node.status_code == 200 and exposed["node"]
    assert coordinator.status_code == 200 and exposed["coordinator"]
    for service, families in exposed.items():
        undocumented = sorted(
            f for f in families if not any(_documented(n, f) for n in documented[service])
        )
        unknown = sorted(
            n for n in documented[service] if not any(_documented(n, f) for f in families)
        )
        assert not undocumented, f"{service} exposes metrics the guides do not list: {undocumented}"
        assert not unknown, f"the guides list {service} metrics it does not expose: {unknown}"


def test_the_expect_checker_matches_lines_with_ellipses() -> None:
    # Prepare / Execute / Assert
    output = " ok  enrollment: site st-marys at https://x:1\naudit log intact: 12 entries\n"
    assert (
        missing_lines("ok enrollment: site st-marys at …\naudit log intact: … entries", output)
        == []
    )
    assert missing_lines("audit log broken", output) == ["audit log broken"]
