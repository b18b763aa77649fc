"""The stop-signal handling around ``trio.run`` (aleatoria.workers): pure, in process."""

from __future__ import annotations

import signal

import trio

from aleatoria.workers import hold_stop_signals, release_wakeup_fd


def test_a_signal_after_the_receiver_closed_is_noted_and_not_written_to_trios_socket() -> None:
    """trio closes its wakeup socket before putting the old wakeup fd back, so a signal in
    between was an "Exception ignored ... BrokenPipeError" traceback on stderr (a second
    SIGINT as a server stopped; seen in CI). Once the receiver has closed,
    ``release_wakeup_fd`` takes the fd back from trio; the handler in place still notes the
    signal."""
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    fds: list[int] = []

    async def main() -> list[int]:
        noted = hold_stop_signals()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM):
            pass
        trios = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(trios, warn_on_full_buffer=False)  # as trio set it
        fds.append(trios)
        release_wakeup_fd()
        fds.append(signal.set_wakeup_fd(-1))  # where a signal would be written now
        signal.raise_signal(signal.SIGINT)
        return noted

    try:
        noted = trio.run(main)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    assert fds[0] != -1 and fds[1] == -1, fds
    assert [signal.SIGINT] == noted
