"""Ctrl-C and SIGTERM: the first asks the loop to checkpoint and stop, the second stops at once."""

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def graceful_stop() -> Iterator[Callable[[], bool]]:
    """Yield a function that says whether a stop was asked for; restore the old handlers afterwards.

    The first Ctrl-C (SIGINT) or SIGTERM only sets a flag: the loop finishes its micro-step, writes a
    checkpoint and stops. It also puts the default handlers back, so a second one exits at once.
    """
    asked: list[int] = []

    def ask(signum: int, frame) -> None:
        asked.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name}: finishing this micro-step, then writing a checkpoint "
              "(press Ctrl-C again to quit at once, without one)", file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, ask) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(asked)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
