"""Small things an operator meets on the command line, each as a real process where the
process is the point: the load-test tool without its extras, ``--plot``'s path and legend,
``aleatoria token`` with a short secret."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aleatoria.auth import token_expiry
from aleatoria.loadtest.plot import draw
from aleatoria.loadtest.stats import Stats

REPO = Path(__file__).resolve().parents[1]
# Runs the tool's entry point with its extras made unimportable (as after a plain install).
_WITHOUT = (
    "import sys\n"
    "for name in {names!r}: sys.modules[name] = None\n"
    "from aleatoria.loadtest.launch import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("missing", [["rich"], ["trio_websocket", "rich"]])
def test_loadtest_without_its_extras_names_the_install_command(missing: list[str]) -> None:
    """``aleatoria-loadtest --help`` without the load-test extras: one clear line naming
    ``pip install 'aleatoria[loadtest]'`` and what is missing, exit 2, no traceback."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT.format(names=missing), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert 2 == done.returncode
    assert "" == done.stdout
    assert "pip install 'aleatoria[loadtest]'" in done.stderr
    assert all(name in done.stderr for name in missing)
    assert "Traceback" not in done.stderr
    assert 1 == len(done.stderr.strip().splitlines())


def test_the_installed_entry_point_is_the_launcher() -> None:
    """The ``aleatoria-loadtest`` script goes through the launcher (the check above)."""
    text = (REPO / "pyproject.toml").read_text()
    assert 'aleatoria-loadtest = "aleatoria.loadtest.launch:main"' in text


def test_plot_has_no_legend_entry_without_a_line() -> None:
    """A metric seen in one time slot only (connects, typically) is drawn as a dot: every
    labelled line of the plot has two points or a marker; the histogram shows shares, so a
    small metric is visible next to a big one."""
    stats = Stats(epoch_ns=0)
    for i in range(200):
        stats.observe("connect", 5_000_000 + i * 1000, at_ns=1_000_000)  # one slot
    for i in range(20_000):
        stats.observe("room.delivery", 2_000_000 + (i % 50) * 100_000, at_ns=i * 100_000)
    figure = draw(stats, "test")
    over_time, histogram = figure.axes
    labelled = [line for line in over_time.get_lines() if not line.get_label().startswith("_")]
    assert {"connect p50", "connect p99", "room.delivery p50", "room.delivery p99"} == {
        line.get_label() for line in labelled
    }
    for line in labelled:
        assert len(line.get_xdata()) >= 2 or line.get_marker() not in (None, "None", "", " "), line
    tops = [max(patch.get_path().vertices[:, 1]) for patch in histogram.patches]
    assert all(0 < top <= 1 for top in tops)  # shares of each metric's samples
    import matplotlib.pyplot as plt

    plt.close(figure)


@pytest.mark.loopback  # the load-test tool dials a real (unreachable) port
def test_cli_prints_where_it_wrote_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--plot FILE`` says where the PNG went (on stderr, so --json stays one object)."""
    from aleatoria.loadtest.cli import main

    png = tmp_path / "out.png"
    # An unreachable server: the run reports that (exit 1), and still writes the plot.
    code = main(["conns", "--url", "ws://127.0.0.1:9", "--connections", "1", "--duration", "0.1",
                 "--quiet", "--json", "--plot", str(png), "--connect-timeout", "0.5"])  # fmt: skip
    assert 1 == code
    assert png.read_bytes().startswith(b"\x89PNG")
    out, err = capsys.readouterr()
    assert f"aleatoria-loadtest: plot written to {png.resolve()}" in err.splitlines()
    assert out.startswith("{")  # stdout: the JSON object alone


def test_token_with_a_short_secret_warns_in_our_words() -> None:
    """``aleatoria token alice --secret s3cret``: the token on stdout, one warning line of
    ours on stderr (no PyJWT warning), and the token is valid."""
    done = subprocess.run(
        [sys.executable, "-W", "default", "-m", "aleatoria", "token", "alice", "--secret", "s3cret"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 0 == done.returncode, done.stderr
    assert [
        "aleatoria: warning: the secret is 6 bytes; use at least 32 random bytes outside development "
        "(the server warns too)"
    ] == done.stderr.strip().splitlines()
    token = done.stdout.strip()
    with_warnings_as_errors = token_expiry(token, "alice", "s3cret")  # filterwarnings=error
    assert with_warnings_as_errors > 0


@pytest.mark.parametrize("ttl", ["0", "0.5", "0s"])
def test_token_with_a_ttl_under_a_second_is_refused(ttl: str) -> None:
    """``aleatoria token alice --ttl 0`` printed a token whose ``exp`` was its ``iat``: every
    server refused it (401). Now one line saying why, exit 2, nothing on stdout."""
    secret = "0123456789abcdef0123456789abcdef"
    done = subprocess.run(
        [sys.executable, "-m", "aleatoria", "token", "alice", "--secret", secret, "--ttl", ttl],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 2 == done.returncode, done.stdout
    assert "" == done.stdout
    assert [f"aleatoria: --ttl must be at least 1s, got {ttl!r}"] == done.stderr.strip().splitlines()
