"""Ctrl-C and SIGTERM, handled from the first line of a run until its delta is on disk.

What the first one does depends on what a stop would lose:
    setting up, evaluating the untrained model   nothing yet: stop at once (Interrupted), saying so
    training                                     the step under way: finish it, write a checkpoint, stop
    writing the delta                            the run: finish writing it, then stop
    after the delta                              nothing: stop at once, saying the delta is saved
A second one, while a step or the delta is being finished, quits at once without a checkpoint.
"""

import contextlib
import signal
import sys
from collections.abc import Iterator

from bitfit.core.errors import Interrupted


class StopRequest:
    """What the first Ctrl-C or SIGTERM leaves for the run: whether to stop, and how.

    `at_once` is the message to stop with immediately, or None while work is under way that a stop
    must not cut in half (a step, the delta); then the run reads `asked` when that work is done, and
    `finishing` names it for the message printed at the signal."""

    def __init__(self) -> None:
        self.asked = False
        self.at_once: str | None = "before any step ran; nothing was lost (a resumed run's checkpoint is as it was): run the same command again"
        self.finishing = ""


@contextlib.contextmanager
def graceful_stop(announce: bool = True) -> Iterator[StopRequest]:
    """Handle Ctrl-C (SIGINT) and SIGTERM as the module docstring says while the block runs (`announce`:
    print what happens; under torchrun only rank 0 speaks). The old handlers come back when it ends."""
    stop = StopRequest()

    def ask(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if stop.at_once is not None:
            raise Interrupted(f"{name} {stop.at_once}")
        stop.asked = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one quits at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if announce:
            print(f"\n{name}: finishing {stop.finishing} (press Ctrl-C again to quit at once, without a checkpoint)",
                  file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, ask) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
