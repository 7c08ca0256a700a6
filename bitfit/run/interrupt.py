"""Ctrl-C and SIGTERM, handled from the first line of a run until its delta is on disk.

What the first one does depends on what a stop would lose:
    setting up, evaluating the untrained model   nothing yet: stop at once (Interrupted), saying so
    training                                     the step under way: finish it, write a checkpoint, stop
    writing the delta                            the run: finish writing it, then stop
    after the delta                              nothing: stop at once, saying the delta is saved
A second one, while a step or the delta is being finished, quits at once without a checkpoint.

Before all that, while a command starts (its imports of torch and transformers take seconds), Ctrl-C
ends it with one line, not an import's traceback: `quiet_while_starting`.
"""

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

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
            if in_finalizer(frame):  # Python would print the exception and go on: ask again in a moment
                threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
                return
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


def in_finalizer(frame) -> bool:
    """Whether `frame` runs inside a __del__ (or a weakref callback the collector runs), where an exception
    a signal handler raises is printed and ignored, not raised."""
    while frame is not None:
        if frame.f_code.co_name in ("__del__", "_remove_dead_weakref", "_remove"):
            return True
        frame = frame.f_back
    return False


COMMANDS = ("train.py", "generate.py")  # at the top of the repository; the rest are bitfit-* scripts and -m bitfit.*


def started_as_command() -> bool:
    """Whether this process was started as one of bitfit's commands (python train.py or generate.py of this
    checkout, a bitfit-* console script, python -m bitfit....), not as a script, notebook or test that
    imports bitfit: those keep Python's own Ctrl-C."""
    options = iter(getattr(sys, "orig_argv", [])[1:])  # the interpreter's options, up to what it runs
    for option in options:
        if option.startswith("-m"):  # -m bitfit.x, or -mbitfit.x
            return (option[2:] or next(options, "")).startswith("bitfit.")
        if option in ("-X", "-W"):
            next(options, None)  # its value
        elif not option.startswith("-") or option == "-c":
            break  # a script (looked at below), or a command: not a module
    script = Path(sys.argv[0])
    checkout = Path(__file__).resolve().parents[2]
    return script.name.startswith("bitfit-") or (script.name in COMMANDS and script.resolve().parent == checkout)


def quiet_while_starting() -> None:
    """Until the command's main() runs (bitfit.cli.entry_point calls `started`), make Ctrl-C print
    'interrupted' and exit 130 at once, as the command itself answers it: nothing is written yet, so
    nothing is lost. bitfit/__init__.py calls this first, in a command's main thread only, and only where
    Ctrl-C still does what Python does by default. A module of your own run as `python -m bitfit....` must
    wrap its main() in bitfit.cli.entry_point, or Ctrl-C stays this quick exit for its whole run."""
    if (started_as_command() and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _stop_starting)


def _stop_starting(signum: int, frame) -> None:
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # not an exception: an import may catch it, and half-imported modules have nothing to close


def started() -> None:
    """The command's main() runs: Ctrl-C is Python's KeyboardInterrupt again, which main() answers."""
    if signal.getsignal(signal.SIGINT) is _stop_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
