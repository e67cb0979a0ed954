"""Every command and code snippet in README.md and docs/*.md runs, as written, on what ships.

Convention (how a page marks what cannot run here)
--------------------------------------------------
Commands go in ```bash blocks, Python in ```python blocks. A block whose first line starts with
``# template:`` is a *template*: it needs files the repository does not ship (your own slides, a
GPU, ``../shared/data``, the internet); the rest of that line tells the reader what to replace.
Templates are not run, only checked: bash syntax (``bash -n``), Python syntax (``compile``), and
every ``hiercls COMMAND --option`` they name must exist. **Every other ```bash and ```python block
runs.** ```sh / ```shell / ```console fences are refused, so no command can hide from this test;
``` and ```text fences (output, folder layouts, usage lines) are not read.

How the blocks run
------------------
The shipped files (``git ls-files``, or the working tree without run outputs) are copied to a
temporary folder, the "fresh clone". README.md runs first, block by block in page order (its main
job leaves ``runs/demo``, which the docs pages may use, as a reader who followed the README has);
then each docs page, in page order, in the same clone, so two pages writing one run folder collide
here as they would for a reader. Bash blocks run with ``bash -euo pipefail``; each Python block
runs in a fresh interpreter state. ``hiercls`` and ``python`` on PATH are the interpreter running
this suite, with this checkout first on PYTHONPATH.

What is not run exactly as written (to keep the cost to about two CPU-minutes)
-------------------------------------------------------------------------------
* ``pip install ...`` prints a note instead of installing (the suite already runs in the
  installed project); ``test_readme_is_two_commands_and_ci_runs_them`` checks that ``.ci/run`` runs
  README's install and test commands. ``python -m pytest`` (this suite) is not run again.
* ``hiercls fit`` and ``hiercls cv`` (except ``fit --resume``) train **one epoch**: their
  ``--epochs N`` is replaced by ``--epochs 1`` (added when only the config sets the number).
  README's main job is therefore run with ``--epochs 1``; a reader's run trains the 16 epochs of
  ``examples/blood-cells/demo.yaml``.
* To save the 3-5 s that importing torch, timm and scikit-learn costs each command, ``hiercls``
  and the Python blocks run in a child forked from a server that imported them once (the same
  ``hiercls.cli.main`` a real ``hiercls`` runs, with the command's cwd, environment, stdin,
  stdout and stderr). Set ``HIERCLS_DOCS_NO_FORK=1`` to start a fresh interpreter every time,
  ``HIERCLS_DOCS_TIMINGS=1`` (with ``-s``) to print the wall and CPU seconds of every block.

The long runs carry the ``docs`` marker (``python -m pytest -m "not docs"`` leaves them out); the
README's test command runs them.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
TEMPLATE_MARK = "# template:"
REFUSED_LANGUAGES = {"sh", "shell", "console", "zsh", "shell-session", "bash-session"}
# Commands a page may show that this suite does not run again (see the module docstring).
INSTALL_COMMAND = 'pip install -e ".[dev]" -e plugins/hiercls-torchvision -e plugins/hiercls-hxe'
TEST_COMMAND = "python -m pytest -q"
BLOCK_TIMEOUT_S = 600
RUN_OUTPUTS = {".git", "runs", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", ".venv", "venv"}


# ----------------------------------------------------------------------------- reading the pages


@dataclass(frozen=True)
class Block:
    page: str        # path relative to the repository root
    line: int        # line of the opening fence (1-based)
    language: str
    code: str

    @property
    def is_template(self) -> bool:
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")
        return first.startswith(TEMPLATE_MARK)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def read_blocks(page: Path, root: Path = REPO_ROOT) -> list[Block]:
    """The fenced code blocks of a markdown page, in page order (indented fences included)."""
    blocks, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.group(1), match.group(2), match.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        rel = page.relative_to(root).as_posix()
        blocks.append(Block(rel, i + 1, language, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.language in ("bash", "python") and not b.is_template]


def hiercls_invocations(bash: str) -> list[list[str]]:
    """The argument lists of every ``hiercls ...`` command in a bash text (continuations joined)."""
    text = bash.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            if words[:1] == ["hiercls"]:
                found.append(words[1:])
            elif words[:3] in (["python", "-m", "hiercls"], ["python3", "-m", "hiercls"]):
                found.append(words[3:])
    return found


# ----------------------------------------------------------------------------- the fresh clone


def shipped_files() -> list[Path]:
    """The files a clone has: ``git ls-files`` when this is a git checkout, else the tree minus outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True, timeout=60)
        files = [Path(p) for p in out.stdout.decode().split("\0") if p]
        if files:
            return [f for f in files if (REPO_ROOT / f).is_file()]
    except (OSError, subprocess.SubprocessError):
        pass
    return [
        p.relative_to(REPO_ROOT)
        for p in REPO_ROOT.rglob("*")
        if p.is_file() and not RUN_OUTPUTS.intersection(p.relative_to(REPO_ROOT).parts)
        and ".egg-info" not in str(p)
    ]


def make_clone(dest: Path) -> Path:
    for rel in shipped_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, target)
    return dest


# The `hiercls` on PATH: applies the epoch budget, then asks the fork server to run the command
# (or, without one, execs a fresh interpreter).
HIERCLS_SHIM = r'''#!@PYTHON@
import json, os, socket, sys

def budget(argv):
    if argv[:1] not in (["fit"], ["cv"]) or "--resume" in argv:
        return argv
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--epochs":
            skip = True
        elif not word.startswith("--epochs="):
            out.append(word)
    return out + ["--epochs", "1"]

argv = budget(sys.argv[1:])
address = os.environ.get("HIERCLS_DOCS_SERVER")
if address:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(address)
    request = {"kind": "hiercls", "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
    reply = sock.recv(64)
    sys.exit(int(reply) if reply else 70)
os.execv(sys.executable, [sys.executable, "-m", "hiercls", *argv])
'''

PYTHON_SHIM = r'''#!/usr/bin/env bash
# `python` as the pages see it: the suite's interpreter; pytest and pip install are not run again.
if [ "${1-}" = -m ] && [ "${2-}" = pytest ]; then echo "(docs test) not running the test suite again: python $*"; exit 0; fi
if [ "${1-}" = -m ] && [ "${2-}" = pip ] && [ "${3-}" = install ]; then echo "(docs test) not installing: python $*"; exit 0; fi
exec @PYTHON@ "$@"
'''

PIP_SHIM = """#!/usr/bin/env bash
if [ "${1-}" = install ]; then echo "(docs test) not installing: pip $*"; exit 0; fi
exec @PYTHON@ -m pip "$@"
"""


def write_shims(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("hiercls", HIERCLS_SHIM), ("python", PYTHON_SHIM), ("python3", PYTHON_SHIM),
                       ("pip", PIP_SHIM), ("pip3", PIP_SHIM)):
        path = bin_dir / name
        path.write_text(text.replace("@PYTHON@", sys.executable), encoding="utf-8")
        path.chmod(0o755)


# ----------------------------------------------------------------------------- the fork server

# Runs in its own process: imports hiercls and its heavy dependencies once, then forks one child
# per request with the client's cwd, environment and standard streams.
SERVER_CODE = r'''
import json, os, resource, signal, socket, sys, traceback
import hiercls.cli, hiercls.cv, hiercls.inference, hiercls.explain, hiercls.data.audit, hiercls.engine
import hiercls.plugins, hiercls.report, matplotlib.pyplot, torchvision

signal.signal(signal.SIGCHLD, signal.SIG_IGN)          # children are reaped automatically

def child(request, conn):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["kind"] == "hiercls":
        sys.argv = ["hiercls", *request["argv"]]
        try:
            rc = hiercls.cli.main(request["argv"])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    else:
        sys.argv = ["-c"]
        sys.path.insert(0, request["cwd"])
        try:
            exec(compile(request["code"], request["name"], "exec"), {"__name__": "__main__"})
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    sys.stdout.flush(); sys.stderr.flush()
    if os.environ.get("HIERCLS_DOCS_CPU_LOG"):                 # CPU seconds, for the timings table
        usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        with open(os.environ["HIERCLS_DOCS_CPU_LOG"], "a") as log:
            log.write(f"{sum(u.ru_utime + u.ru_stime for u in usage)}\n")
    conn.send(str(rc).encode())

server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
server.bind(sys.argv[1])
server.listen(16)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    message, fds, _, _ = socket.recv_fds(conn, 1 << 22, 3)
    if os.fork() == 0:
        server.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        try:
            child(json.loads(message), conn)
        finally:
            os._exit(0)
    for fd in fds:
        os.close(fd)
    conn.close()
'''


class ForkServer:
    def __init__(self, folder: Path, env: dict[str, str]):
        self.address = str(folder / "server.sock")
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER_CODE, self.address], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, text=True,
        )
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            rest = self.process.stdout.read() if self.process.poll() is not None else ""
            raise RuntimeError(f"docs fork server did not start: {ready}{rest}")

    def run_python(self, code: str, name: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
        """Run a snippet in a forked child; its return code and combined output."""
        with open(cwd / ".snippet-output.txt", "w+b") as out, open(os.devnull, "rb") as stdin:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(timeout)
            sock.connect(self.address)
            request = {"kind": "python", "code": code, "name": name, "cwd": str(cwd), "env": env}
            socket.send_fds(sock, [json.dumps(request).encode()], [stdin.fileno(), out.fileno(), out.fileno()])
            reply = sock.recv(64)
            sock.close()
            out.seek(0)
            text = out.read().decode(errors="replace")
        os.unlink(cwd / ".snippet-output.txt")
        return (int(reply) if reply else 70), text

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)     # the server and any child it left behind
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


# ----------------------------------------------------------------------------- running blocks


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    server: ForkServer | None
    readme_failure: str | None = None

    def run(self, block: Block) -> str | None:
        """Run one block; ``None`` when it succeeded, else a message for the test failure."""
        started, cpu_before = time.monotonic(), self.cpu_seconds()
        if block.language == "bash":
            script = self.root / ".block.sh"
            script.write_text(block.code, encoding="utf-8")
            try:
                proc = subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=self.root, env=self.env,
                                      capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                return f"{block.where}: timed out after {BLOCK_TIMEOUT_S}s:\n{block.code}"
            rc, output = proc.returncode, proc.stdout + proc.stderr
        elif self.server is not None:
            rc, output = self.server.run_python(block.code, block.where, self.root, self.env, BLOCK_TIMEOUT_S)
        else:
            proc = subprocess.run([sys.executable, "-c", block.code], cwd=self.root, env=self.env, capture_output=True,
                                  text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        TIMINGS.append((block.where, time.monotonic() - started, self.cpu_seconds() - cpu_before))
        if rc != 0:
            return (f"{block.where} ({block.language}) exited {rc}:\n{block.code}\n"
                    f"--- output (last 4000 chars) ---\n{output[-4000:]}")
        return None

    def cpu_seconds(self) -> float:
        """CPU time of this suite's direct children and of the fork server's children so far."""
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        log = Path(self.env.get("HIERCLS_DOCS_CPU_LOG", os.devnull))
        forked = sum(float(x) for x in log.read_text().split()) if log.is_file() else 0.0
        return usage.ru_utime + usage.ru_stime + forked

    def run_page(self, page: Path) -> str | None:
        for block in runnable(read_blocks(page)):
            failure = self.run(block)
            if failure:
                return failure
        return None


TIMINGS: list[tuple[str, float, float]] = []  # (block, wall seconds, CPU seconds)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """A fresh clone where README.md has run (so runs/demo exists), with the shims on PATH."""
    base = tmp_path_factory.mktemp("docs")
    root = make_clone(base / "clone")
    write_shims(base / "bin")
    env = dict(os.environ)
    env["PATH"] = f"{base / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("MPLBACKEND", "Agg")
    env["COLUMNS"] = "120"
    env["HIERCLS_DOCS_CPU_LOG"] = str(base / "cpu.log")
    server = None
    if os.environ.get("HIERCLS_DOCS_NO_FORK") != "1" and hasattr(socket, "send_fds") and hasattr(os, "fork"):
        server = ForkServer(base, env)
        env["HIERCLS_DOCS_SERVER"] = server.address
    ws = Workspace(root, env, server)
    ws.readme_failure = ws.run_page(REPO_ROOT / "README.md")
    yield ws
    if server is not None:
        server.stop()
    if os.environ.get("HIERCLS_DOCS_TIMINGS"):
        print("\n  wall s   CPU s  block")
        print("\n".join(f"{wall:8.1f} {cpu:7.1f}  {where}" for where, wall, cpu in TIMINGS))
        print(f"{sum(t[1] for t in TIMINGS):8.1f} {sum(t[2] for t in TIMINGS):7.1f}  total")


# ----------------------------------------------------------------------------- the tests

# Pages whose blocks fail because of a known bug in hiercls (not in the page): page -> reason.
KNOWN_BUGS: dict[str, str] = {}


def _page_param(page: Path):
    rel = page.relative_to(REPO_ROOT).as_posix()
    marks = [pytest.mark.docs]
    if rel in KNOWN_BUGS:
        marks.append(pytest.mark.xfail(reason=KNOWN_BUGS[rel], strict=True))
    return pytest.param(page, id=rel, marks=marks)


@pytest.mark.docs
def test_readme_commands_run(workspace: Workspace) -> None:
    assert workspace.readme_failure is None, workspace.readme_failure
    assert (workspace.root / "runs" / "demo" / "eval" / "report.md").is_file(), "README's main job wrote no report"


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES[1:]])
def test_docs_page_commands_run(workspace: Workspace, page: Path) -> None:
    if workspace.readme_failure:
        pytest.fail(f"README.md's commands failed first (the pages use its runs/demo):\n{workspace.readme_failure}")
    failure = workspace.run_page(page)
    assert failure is None, failure


# -- cheap checks: no fork server, no training -------------------------------------------------


def _all_blocks() -> list[Block]:
    return [b for page in PAGES for b in read_blocks(page)]


def test_commands_only_in_bash_or_python_blocks() -> None:
    refused = [f"{b.where} (```{b.language})" for b in _all_blocks() if b.language in REFUSED_LANGUAGES]
    assert not refused, "use ```bash for commands (the docs test runs only bash and python blocks): " + ", ".join(refused)


def test_templates_are_valid_bash_and_python() -> None:
    problems = []
    for block in (b for b in _all_blocks() if b.is_template and b.language in ("bash", "python")):
        if block.language == "bash":
            proc = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
            if proc.returncode:
                problems.append(f"{block.where}: {proc.stderr.strip()}")
        else:
            try:
                compile(block.code, block.where, "exec")
            except SyntaxError as exc:
                problems.append(f"{block.where}: {exc}")
    assert not problems, "\n".join(problems)


def _options_of(parser) -> set[str]:
    """Every option string of a parser and of its nested sub-commands."""
    import argparse

    options = set()
    for action in parser._actions:
        options.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= _options_of(sub)
    return options


def test_every_documented_hiercls_option_exists() -> None:
    """Runnable or template, a ``hiercls COMMAND --option`` in the docs must be a real one."""
    import argparse

    from hiercls.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    problems = []
    for block in (b for b in _all_blocks() if b.language == "bash"):
        for argv in hiercls_invocations(block.code):
            if not argv or argv[0].startswith("-"):
                continue
            if argv[0] not in sub.choices:
                problems.append(f"{block.where}: no command `hiercls {argv[0]}`")
                continue
            known = _options_of(sub.choices[argv[0]])
            for word in argv[1:]:
                name = word.split("=", 1)[0]
                if name.startswith("--") and name not in known:
                    problems.append(f"{block.where}: `hiercls {argv[0]}` has no option {name}")
    assert not problems, "\n".join(problems)


def test_template_mark_is_recognised() -> None:
    """The convention itself: a marked block is a template, an unmarked one runs."""
    marked = Block("x.md", 1, "bash", "\n# template: replace paths with yours\nhiercls fit --data mine/\n")
    plain = Block("x.md", 1, "bash", "hiercls plugins  # template: not at the start\n")
    assert marked.is_template and not plain.is_template
    assert runnable([marked, plain]) == [plain]


def test_readme_is_two_commands_and_ci_runs_them() -> None:
    """README: one command installs and runs the main job, one installs and runs the tests;
    .ci/run installs the project exactly as README says and runs README's test command."""
    setup = (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("\n## ")[1]
    assert setup.startswith("Set up")
    blocks = runnable(read_blocks(REPO_ROOT / "README.md"))
    commands = [b.code.strip() for b in blocks if b.code.strip().startswith(INSTALL_COMMAND)]
    assert len(commands) == 2, f"README should have 2 commands starting with the install command, found {commands}"
    job, tests = commands
    assert "hiercls fit" in job and "hiercls evaluate" in job, job
    assert tests == f"{INSTALL_COMMAND} && {TEST_COMMAND}", tests
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "set -euo pipefail" in ci
    ci_lines = [ln.strip() for ln in ci.splitlines()]
    assert tests in ci_lines, f".ci/run must run README's command `{tests}`:\n{ci}"


def test_block_reader_sees_indented_fences_and_languages(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("text\n\n```bash\nhiercls plugins\n```\n\n- item\n\n  ```python\n  print(1)\n  ```\n", encoding="utf-8")
    blocks = read_blocks(page, root=tmp_path)
    assert [(b.language, b.code, b.line) for b in blocks] == [("bash", "hiercls plugins\n", 3), ("python", "print(1)\n", 9)]


def test_failing_blocks_are_reported(tmp_path: Path) -> None:
    """A block that fails (the old getting-started snippet's NameError, a failing command) fails the page."""
    ws = Workspace(tmp_path, dict(os.environ), server=None)
    python_failure = ws.run(Block("docs/x.md", 7, "python", "probs = model.predict_proba(images)\n"))
    assert python_failure and "docs/x.md:7" in python_failure and "NameError" in python_failure
    bash_failure = ws.run(Block("docs/x.md", 9, "bash", "true\nfalse\necho never\n"))
    assert bash_failure and "exited 1" in bash_failure and "never" not in bash_failure.split("--- output")[1]
    assert ws.run(Block("docs/x.md", 11, "bash", "echo fine\n")) is None


def test_hiercls_invocations_are_found_across_continuations_and_chains() -> None:
    text = ("pip install x && hiercls fit --out r \\\n    --epochs 5 && hiercls evaluate --run r  # note\n"
            "python -m hiercls plugins\n")
    assert hiercls_invocations(text) == [["fit", "--out", "r", "--epochs", "5"], ["evaluate", "--run", "r"], ["plugins"]]


@pytest.mark.docs
def test_fork_server_reports_exit_codes_and_errors(workspace: Workspace) -> None:
    """Through the fork server, a failing snippet or command fails like it would in a fresh process."""
    failure = workspace.run(Block("docs/x.md", 1, "python", "import hiercls\nundefined_name\n"))
    assert failure and "NameError" in failure
    failure = workspace.run(Block("docs/x.md", 2, "bash", "hiercls fit --no-such-option\n"))
    assert failure and "exited 2" in failure and "--no-such-option" in failure
    failure = workspace.run(Block("docs/x.md", 3, "bash", "hiercls taxonomy validate no-such-tree.yaml\n"))
    assert failure and "exited 2" in failure
    assert workspace.run(Block("docs/x.md", 4, "python", "import sys\nsys.exit(0)\n")) is None


def test_and_chains_only_end_a_block() -> None:
    """Under ``set -e`` a failure inside ``a && b`` does not stop the script, so a chain anywhere but
    on a block's last command could fail unseen; the pages keep chains to the last line."""
    problems = []
    for block in (b for b in _all_blocks() if b.language == "bash" and not b.is_template):
        commands = [ln for ln in block.code.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        problems += [f"{block.where}: {ln.strip()[:60]}" for ln in commands[:-1] if "&&" in ln or "||" in ln]
    assert not problems, "\n".join(problems)
