"""The command lines of scripts/: ``--help`` describes each script and runs nothing, and a
wrong argument is a usage error (exit 2), for the measuring scripts and the installers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.loopback  # real subprocesses

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TIMEOUT = 60  # seconds; --help answers at once, a benchmark would take longer


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT, check=False, env=env
    )


@pytest.mark.parametrize(
    ("script", "argument"),
    [("echo_floor.py", "[seconds]"), ("send_cost.py", "[rounds]"), ("session_cost.py", "")],
)
def test_measuring_scripts_answer_help(script: str, argument: str) -> None:
    """--help prints the usage (with the optional positional argument each takes) and a
    description, exits 0 and measures nothing."""
    done = _run([sys.executable, str(SCRIPTS / script), "--help"])
    assert 0 == done.returncode, done.stderr
    assert done.stdout.startswith(f"usage: {script} [-h] {argument}".rstrip())
    assert "us per" not in done.stdout and "us of CPU" not in done.stdout


@pytest.mark.parametrize("argv", [["echo_floor.py", "soon"], ["send_cost.py", "0"], ["session_cost.py", "x"]])
def test_measuring_scripts_refuse_a_bad_argument(argv: list[str]) -> None:
    """A value that is not a number (or not positive), or an argument the script does not
    take, is a usage error."""
    done = _run([sys.executable, str(SCRIPTS / argv[0]), *argv[1:]])
    assert 2 == done.returncode, done.stdout
    assert "error:" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["connect_cost.py", "--count", "0"],
        ["level2_memory.py", "--n", "0"],
        ["redis_message_cost.py", "--mode", "memory", "--count", "0"],
        ["redis_message_cost.py", "--mode", "memory", "--kinds", "rooms"],
        ["dm_floor.py", "--port", "70000"],
        ["match_floor.py", "--port", "70000"],
        ["match_floor.py", "--redis-url", "redis://127.0.0.1:1/0"],  # nothing listens on port 1
        ["handshake_floor.py", "--port", "-1"],
    ],
)
def test_measuring_scripts_refuse_a_count_or_port_that_cannot_work(argv: list[str]) -> None:
    """A count of 0 (a figure per unit over no units), an unknown kind, a port out of range or
    a Redis that is not there is a one-line usage error before anything runs, not a traceback."""
    done = _run([sys.executable, str(SCRIPTS / argv[0]), *argv[1:]])
    assert 2 == done.returncode, done.stderr
    assert "Traceback" not in done.stderr
    assert "error:" in done.stderr.splitlines()[-1]


def test_connect_cost_refuses_a_count_beyond_the_open_files_limit() -> None:
    """Two open files per connection: a --count the hard limit cannot hold is a usage error
    naming the largest count that fits, not a traceback at the socket pair that fails; that
    count then runs under the same limit."""
    import resource

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    def run(count: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SCRIPTS / "connect_cost.py"), "--count", str(count)],
            capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT, check=False,
            preexec_fn=limit_files, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip

    refused = run(1000)
    assert 2 == refused.returncode, refused.stderr
    assert "Traceback" not in refused.stderr
    last = refused.stderr.splitlines()[-1]
    assert "the limit is 1024" in last and "lower --count to 280" in last  # (1024 - 64) // 2 - 200
    fits = run(280)
    assert 0 == fits.returncode, fits.stderr
    assert "us CPU per connect" in fits.stdout


@pytest.mark.parametrize("script", ["match_curve.py", "side_by_side.py"])
def test_runners_refuse_an_out_directory_they_cannot_create(script: str, tmp_path: Path) -> None:
    """--out under a regular file (or anywhere it cannot be created) is a usage error naming
    --out, not a traceback after the checks; side_by_side.py refuses --runs 0 the same way."""
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "compare.py").write_text("")
    loadgen = tmp_path / "loadgen"
    loadgen.write_text("")
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {**os.environ, "LOADGEN": str(loadgen), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, str(SCRIPTS / script), "--bench", str(bench), "--out", str(blocker / "out")]
    done = _run(argv, env=env)
    if script == "side_by_side.py":  # it needs a redis-server first: --runs 0 is refused before that
        done = _run([*argv, "--redis-url", "redis://127.0.0.1:1/0", "--runs", "0"], env=env)
        assert 2 == done.returncode, done.stderr
        assert "--runs" in done.stderr.splitlines()[-1]
        return
    assert 2 == done.returncode, done.stderr
    assert "Traceback" not in done.stderr
    assert "--out" in done.stderr.splitlines()[-1]


def test_redis_message_cost_says_when_its_figure_is_coarser_than_the_cpu_clock() -> None:
    """/proc counts CPU in 10 ms ticks: with --count 200 every figure is a multiple of 50 us a
    message, so the script warns and names --count, rather than print "100.0 us" as a
    measurement."""
    done = _run(
        [sys.executable, str(SCRIPTS / "redis_message_cost.py"), "--mode", "memory", "--kinds", "room",
         "--count", "200", "--rooms", "1", "--members", "2", "--senders", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert 0 == done.returncode, done.stderr
    assert "us CPU per room message" in done.stdout
    assert "clock ticks of CPU measured" in done.stderr and "--count" in done.stderr


STUBBED = ("apt-get", "apt-cache", "sudo", "systemctl", "pip", "python3")


@pytest.fixture
def bare_path(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose PATH holds only the few tools the installers use to start, and
    stubs that log their call instead of installing (so no redis-server, turnserver or
    chromium is found, and a script that went on would show in the log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("bash", "sh", "cat", "dirname", "id"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    for tool in STUBBED:
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\nexit 0\n')
        stub.chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHON": str(bin_dir / "python3")}
    return env, log


INSTALLERS = ["install-redis.sh", "install-coturn.sh", "install-browser.sh"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", INSTALLERS)
def test_installers_answer_help_without_installing(
    script: str, flag: str, bare_path: tuple[dict[str, str], Path]
) -> None:
    """--help (or -h) says what the installer does and exits 0 having run nothing."""
    env, log = bare_path
    done = _run([str(SCRIPTS / script), flag], env=env)
    assert 0 == done.returncode, done.stderr
    assert done.stdout.startswith(f"usage: scripts/{script} [-h|--help]\n\n")
    assert not log.exists(), log.read_text()


@pytest.mark.parametrize("script", INSTALLERS)
def test_installers_refuse_an_unknown_argument(script: str, bare_path: tuple[dict[str, str], Path]) -> None:
    """An argument the installer does not know: exit 2 with the usage, nothing run."""
    env, log = bare_path
    done = _run([str(SCRIPTS / script), "--yes"], env=env)
    assert 2 == done.returncode, done.stderr
    assert "unknown argument: --yes" in done.stderr and "usage:" in done.stderr
    assert not log.exists(), log.read_text()


def test_the_installers_are_executable() -> None:
    """They are run as ``scripts/install-*.sh`` (docs, CI)."""
    for script in INSTALLERS:
        assert os.access(SCRIPTS / script, os.X_OK), script


@pytest.mark.parametrize("script", ["dm_floor.py", "handshake_floor.py", "match_floor.py"])
def test_a_floor_stops_on_ctrl_c_without_a_traceback(script: str) -> None:
    """Ctrl-C (SIGINT) on a floor server run by hand: it says so and exits 130, no traceback
    (it ended with a KeyboardInterrupt group's traceback and exit 1)."""
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTS / script), "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert "listening on 127.0.0.1:" in process.stdout.readline()  # serving: trio runs
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
    assert 130 == process.returncode, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
