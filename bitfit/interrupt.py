"""Ctrl-C and SIGTERM: the first asks the loop to stop after the step it is on, the second stops at once."""

import contextlib
import signal
import sys
from collections.abc import Iterator


class StopRequest:
    """What the first Ctrl-C or SIGTERM leaves for the training loop: whether to stop, and at which step.

    The loop sets `step` to the step it is working on, so the message can name it; it reads `asked`
    between steps, never inside one, so a checkpoint only ever holds a finished step."""

    def __init__(self) -> None:
        self.asked = False
        self.step = 0


@contextlib.contextmanager
def graceful_stop(announce: bool = True) -> Iterator[StopRequest]:
    """Handle the first Ctrl-C (SIGINT) or SIGTERM by setting `asked`, and say so at once (if `announce`:
    under torchrun only rank 0 speaks). The default handlers come back at that moment, so a second one
    exits at once; the old handlers come back when the block ends."""
    stop = StopRequest()

    def ask(signum: int, frame) -> None:
        stop.asked = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if announce:
            print(f"\n{signal.Signals(signum).name}: finishing step {stop.step}, then writing a checkpoint "
                  "(press Ctrl-C again to quit at once, without one)", file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, ask) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
