"""Docs that run (issue 13, section 8): every shell command in README.md and docs/*.md runs as written on the
demo fleet, and every file a doc names by relative path is in the repo.

What is a command: the lines of a fenced block tagged ``bash``/``sh``/``shell``/``console``, or of an untagged
block whose first line starts with a command word (``fleet``, ``python``, ``make``, ``curl``, ``kubectl``,
``mlflow``, ``source``, ``export``, or ``NAME=value`` before one). Blank and ``#`` lines are not commands, a
trailing ``\\`` joins the next line, a ``$ `` prompt is dropped. ``commands()`` lists them with file:line.

Which are not run, by two explicit rules (each skip carries its reason; ``-rs`` lists them):

- ``<!-- not run: REASON -->`` on the line before a fence: nothing in that block runs (a usage synopsis, a
  Kubernetes cluster, a multi-hour benchmark);
- ``SKIP``: command prefixes the test cannot provide (below, a reason each).

How they run (``test_docs_run_as_written``, slow): one working directory prepared as ``make demo`` leaves a
checkout: the repo's top-level entries (symlinks), ``.venv/bin`` with ``activate``, ``fleet`` and ``python``
(the interpreter running the tests, this checkout on ``PYTHONPATH``), and ``fleet-data/demo`` = the session's
small test fleet (``small_fleet``: ``fleet synth``'s campaign-00000 ... campaign-00019) compressed by ``fleet
compress`` into ``fleet-data/demo/store`` as fleet ``demo`` with MLflow in ``fleet-data/demo/mlflow.db``, as
jobs/demo.py does (its version is promoted by hand when the small fleet misses the gate, so ``@champion``
exists). README.md first, then docs/*.md by name, in order, as in one terminal: each command is ``bash -c``
in the directory and environment the previous one left (``source``, ``export``, ``cd`` carry over). Each must
exit 0 (``EXIT_CODES``: what the doc states instead). ``fleet serve`` is started in the background, must
answer ``/healthz`` within ``SERVE_TIMEOUT`` seconds, and is stopped at the end of its file (the ``curl``
lines of that file talk to it). A failing command fails the test with its file:line, exit code and stderr.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_TAGS = {"bash", "sh", "shell", "console"}
COMMAND_WORDS = ("fleet", "python", "make", "curl", "kubectl", "mlflow", "source", "export")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
FENCE = re.compile(r"^\s*```(\S*)\s*$")

# Command prefixes (regex at the start of the command) the test does not run, with the reason.
SKIP: list[tuple[str, str]] = [
    (r"make test\b", "the whole test suite (~10 min), of which this test is a part"),
    (r"make demo\b", "creates .venv with pip (network); the fixture builds fleet-data/demo with the real pipeline"),
    (r"fleet synth\b", "trains teachers (tens of minutes for 200 campaigns); the fixture's demo fleet is synth's own"),
    (r"(\w+=\S*\s+)*fleet bench\b", "a benchmark: minutes to hours (its results are what docs/benchmarks.md reports)"),
    (r"R=\S+;\s*fleet bench\b", "a benchmark: minutes to hours (its results are what docs/benchmarks.md reports)"),
    (r"python infra/sizing/", "a sizing measurement over a whole fleet (minutes of CPU)"),
    (r"kubectl\b", "needs a Kubernetes cluster (infra/; tests/test_infra.py checks these commands' flags)"),
    (r"mlflow models serve\b", "a long-running MLflow model server (tests/test_pyfunc*.py load the same pyfunc)"),
    (r"curl -s localhost:5001/", "talks to `mlflow models serve`, not run (above)"),
]
# Commands whose doc states other exit codes than 0.
EXIT_CODES: list[tuple[str, set[int], str]] = [
    (r"fleet compress\b", {0, 3, 4}, "README: 0 ok, 3 = some quarantined, 4 = not promoted"),
]
SERVE_TIMEOUT = 120  # seconds for `fleet serve` to answer /healthz (imports + loading the version)
COMMAND_TIMEOUT = 600


@dataclasses.dataclass
class Command:
    path: pathlib.Path
    line: int
    text: str
    skip: str | None = None  # the reason it is not run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _is_command(line: str) -> bool:
    words = line.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return bool(words) and words[0].rstrip(";") in COMMAND_WORDS


def commands(path: pathlib.Path) -> list[Command]:
    """Every shell command of ``path``'s fenced blocks, in order, with its line and the reason it is skipped."""
    lines = path.read_text().splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        tag, start = m.group(1).lower(), i
        end = i + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        body = [(n + 1, lines[n]) for n in range(start + 1, end)]
        i = end + 1
        first = next((t.strip() for _, t in body if t.strip() and not t.strip().startswith("#")), "")
        if not (tag in SHELL_TAGS or (tag == "" and _is_command(first.removeprefix("$ ")))):
            continue
        before = next((lines[n] for n in range(start - 1, -1, -1) if lines[n].strip()), "")
        marker = NOT_RUN.search(before)
        pending, pending_line = "", 0
        for number, text in body:
            text = text.strip().removeprefix("$ ")
            if not pending and (not text or text.startswith("#")):
                continue
            if not pending:
                pending_line = number
            if text.endswith("\\"):
                pending += text[:-1].rstrip() + " "
                continue
            command = Command(path, pending_line, pending + text)
            pending = ""
            if marker:
                command.skip = f"<!-- not run: {marker.group(1)} -->"
            else:
                command.skip = next((reason for prefix, reason in SKIP if re.match(prefix, command.text)), None)
            out.append(command)
    return out


def all_commands() -> list[Command]:
    return [c for path in DOCS for c in commands(path)]


# ----------------------------------------------------------------------------- fast: what the docs name exists

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_TICKED = re.compile(r"`((?:docs|jobs|infra|fleet|tests|examples)/[A-Za-z0-9_./-]*[A-Za-z0-9_])`")
_WORD = re.compile(
    r"(?<![\w/.$:-])((?:docs|jobs|infra|tests|examples|fleet)/[A-Za-z0-9_./-]*\.(?:md|py|toml|jsonl|parquet|yaml|json|png|sh))\b"
)


def referenced_paths() -> list[tuple[str, str, pathlib.Path]]:
    """``(file:line, as written, resolved path)`` for every relative path a doc names: Markdown links (from the
    doc's folder) and repo paths in backticks or commands (from the repo root)."""
    found = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            where = f"{path.relative_to(ROOT)}:{number}"
            for target in _LINK.findall(line):
                if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                    continue
                found.append((where, target, (path.parent / target.split("#")[0]).resolve()))
            for target in set(_TICKED.findall(line)) | set(_WORD.findall(line)):
                found.append((where, target, ROOT / target))
    return found


def test_every_path_a_doc_names_is_in_the_repo():
    refs = referenced_paths()
    assert len(refs) > 20  # the extraction finds the docs' links
    missing = [
        f"{where}: {text}"
        for where, text, resolved in refs  # `fleet/__init__`: a module, its .py file
        if not (resolved.exists() or resolved.with_name(resolved.name + ".py").exists())
    ]
    assert not missing, "docs name files that are not in the repo:\n" + "\n".join(missing)


def test_commands_are_found_with_their_lines():
    found = all_commands()
    readme = [c for c in found if c.path.name == "README.md"]
    assert readme and readme[0].text.startswith("make demo") and readme[0].line > 1
    assert any(
        c.text.startswith("fleet compress --teachers") and c.text.endswith("--fleet demo") or "--fleet demo " in c.text
        for c in readme
    ), "a continued line is joined"
    assert all(c.skip for c in found if c.text.startswith(("kubectl", "fleet bench", "make test")))
    assert [c for c in found if not c.skip], "some commands run"


# ----------------------------------------------------------------------------- slow: run them on the demo fleet


def _shim(path: pathlib.Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture(scope="module")
def demo_checkout(small_fleet, tmp_path_factory):
    """A directory as ``make demo`` leaves a checkout (see the module docstring); returns it."""
    from fleet.cli.main import main as fleet_main
    from fleet.storage import registry

    work = tmp_path_factory.mktemp("docs-run")
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".venv", "fleet-data", "bench-out", ".pytest_cache"}:
            (work / entry.name).symlink_to(entry)
    venv_bin = work / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(f'export VIRTUAL_ENV="{work / ".venv"}"\nexport PATH="{venv_bin}:$PATH"\n')
    python = shlex.quote(sys.executable)
    _shim(venv_bin / "python", f'exec {python} "$@"\n')
    _shim(venv_bin / "fleet", f'exec {python} -m fleet.cli.main "$@"\n')
    demo = work / "fleet-data" / "demo"
    shutil.copytree(small_fleet["root"], demo)
    tracking = f"sqlite:///{demo}/mlflow.db"
    code = fleet_main(
        [
            "compress",
            "--teachers",
            f"{demo}/teachers",
            "--events",
            f"{demo}/events",
            "--store",
            f"{demo}/store",
            "--fleet",
            "demo",
            "--tracking-uri",
            tracking,
        ]
    )
    assert code in (0, 3, 4), f"the demo's fleet compress exited {code}"
    if registry.champion_version("demo", tracking) is None:
        registry.promote("demo", registry.list_versions("demo", tracking)[-1]["version"], tracking)
    return work


def _port_of(command: str) -> int:
    m = re.search(r"--port[ =](\d+)", command)
    return int(m.group(1)) if m else 8080


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Terminal:
    """One shell session's state (working directory and environment) carried from command to command."""

    def __init__(self, cwd: pathlib.Path):
        self.cwd = str(cwd)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"MLFLOW_TRACKING_URI", "FLEET_STORAGE_OPTIONS", "VIRTUAL_ENV", "PYTHONPATH"}
        }
        env["PATH"] = f"{cwd / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONPATH"] = str(ROOT)
        env["PWD"] = self.cwd
        env.setdefault("FLEET_ADMIN_TOKEN", "docs-run-token")
        self.env = env
        self.state = pathlib.Path(cwd).parent / f"{pathlib.Path(cwd).name}.state"

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        script = f"{command}\n__rc=$?\n{{ pwd; env -0; }} > {shlex.quote(str(self.state))}\nexit $__rc\n"
        out = subprocess.run(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if self.state.exists():
            cwd, _, rest = self.state.read_text().partition("\n")
            self.cwd = cwd
            self.env = dict(item.split("=", 1) for item in rest.split("\0") if "=" in item)
            self.state.unlink()
        return out

    def start(self, command: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _expected_codes(command: str) -> set[int]:
    return next((codes for prefix, codes, _ in EXIT_CODES if re.match(prefix, command)), {0})


def _serve(terminal: Terminal, command: Command, servers: list) -> str | None:
    """Start a ``fleet serve`` command in the background; the failure message, or None once /healthz answers."""
    port = _port_of(command.text)
    if not _port_free(port):
        return f"{command.where}: port {port} is taken on this machine: cannot run `{command.text}`"
    proc = terminal.start(command.text)
    servers.append(proc)
    deadline = time.monotonic() + SERVE_TIMEOUT
    while not _answers(port):
        if proc.poll() is not None:
            return f"{command.where}: `{command.text}` exited {proc.returncode}:\n{proc.stderr.read()[-3000:]}"
        if time.monotonic() > deadline:
            return f"{command.where}: `{command.text}` did not answer /healthz within {SERVE_TIMEOUT} s"
        time.sleep(0.5)
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)  # builds the session's test fleet when first
def test_docs_run_as_written(demo_checkout, capsys):
    terminal = Terminal(demo_checkout)
    ran, skipped, timings = [], [], []
    for path in DOCS:
        servers: list[subprocess.Popen] = []
        try:
            for command in commands(path):
                if command.skip:
                    skipped.append(f"{command.where}: {command.text[:90]}  -- {command.skip}")
                    continue
                started = time.monotonic()
                if re.match(r"fleet serve\b", command.text):
                    failure = _serve(terminal, command, servers)
                    assert failure is None, failure
                else:
                    out = terminal.run(command.text)
                    expected = _expected_codes(command.text)
                    assert out.returncode in expected, (
                        f"{command.where}: `{command.text}` exited {out.returncode} (expected {sorted(expected)})\n"
                        f"stderr:\n{out.stderr[-4000:]}\nstdout:\n{out.stdout[-1500:]}"
                    )
                ran.append(command.where)
                timings.append((time.monotonic() - started, command.where, command.text[:70]))
        finally:
            for proc in servers:
                _stop(proc)
    with capsys.disabled():
        print(f"\ndocs run: {len(ran)} commands run, {len(skipped)} not run:")
        for line in skipped:
            print("  " + line)
        for seconds, where, text in sorted(timings, reverse=True)[:8]:
            print(f"  {seconds:6.1f} s  {where}  {text}")
    assert len(ran) >= 15
