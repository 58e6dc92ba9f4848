"""What every entry point does with errors and signals (``train.py``, ``test.py``, ``visualize.py``,
``python -m datasets.check``, ``python -m utils.summarize``)::

    if __name__ == "__main__":
        run_main(main, prog="train.py", handle_signals=True)

- **Expected errors** -- the types in :data:`EXPECTED_ERRORS`: bad options and values (``ValueError``, which
  ``DatasetFormatError``, ``ImageCheckError``, ``CheckpointReadError`` are), files that are missing, unreadable or
  in the way (``OSError``: ``FileNotFoundError``, ``PermissionError``, ``NotADirectoryError``...) and a diverged run
  (``FloatingPointError``) -- end with their one message on stderr and exit code :data:`EXIT_ERROR`, without a
  Python traceback. ``--debug`` on the command line (removed before the entry point parses it) or the environment
  variable ``IRRA_DEBUG=1`` shows the traceback too.
- **Unexpected errors** (every other type: ``RuntimeError``, ``TypeError``, ``KeyError``...) keep their traceback:
  they are bugs to report.
- **Interruptions**: Ctrl-C (SIGINT) and, with ``handle_signals``, SIGTERM (what job schedulers send before a kill)
  raise :class:`Interrupted` in the main thread; the trainer logs where it stopped and how to resume
  (``processor.processor.do_train``), and the process exits with the conventional code 128 + the signal number:
  130 for SIGINT, 143 for SIGTERM. Inside :func:`interrupts_deferred` (the write of ``last.pth``) a signal waits
  until the block has finished.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from typing import Any, Callable, List, Optional, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "IRRA_DEBUG"
EXIT_ERROR = 1
# Errors a user causes (options, files, data): one message, no traceback.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError)

SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Interrupted(BaseException):
    """The process was asked to stop (SIGINT / SIGTERM). A BaseException, as KeyboardInterrupt: ``except Exception``
    does not swallow it. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"interrupted by {SIGNAL_NAMES.get(self.signum, f'signal {self.signum}')}")


def as_interrupted(err: BaseException) -> Optional[Interrupted]:
    """``err`` as an :class:`Interrupted` (a KeyboardInterrupt is SIGINT); None for any other exception."""
    if isinstance(err, Interrupted):
        return err
    if isinstance(err, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    return None


_deferred_depth = 0
_pending: List[int] = []


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _deferred_depth > 0:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT / SIGTERM (when :func:`handle_interrupts` is active) until the block ends, then raise."""
    global _deferred_depth
    _deferred_depth += 1
    try:
        yield
    finally:
        _deferred_depth -= 1
        if _deferred_depth == 0 and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Interrupted(signum)


@contextlib.contextmanager
def handle_interrupts(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """Turn ``signals`` into :class:`Interrupted` in the main thread for the block (the previous handlers return
    afterwards). Outside the main thread (where Python cannot install handlers) this does nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` in ``argv`` or ``IRRA_DEBUG`` set to anything but empty / 0 / false."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return DEBUG_FLAG in argv or env not in ("", "0", "false", "no")


def _quiet_worker_deaths() -> None:
    """A job's SIGTERM kills the loader workers too; torch's SIGCHLD handler would then raise (with a traceback)
    while the interpreter shuts down. The process is stopping on purpose: let the children's deaths pass."""
    if hasattr(signal, "SIGCHLD"):
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        except ValueError:  # not the main thread
            pass


def run_main(main: Callable[[List[str]], Any], argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
             handle_signals: bool = False) -> None:
    """Run ``main(argv)`` (``argv`` default ``sys.argv[1:]``, ``--debug`` removed) and exit (module docstring):
    0, or ``main``'s return value when it is an int; :data:`EXIT_ERROR` after an expected error; 130 / 143 after
    an interruption."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    prog = prog or os.path.basename(sys.argv[0] or "irra")
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    try:
        with handle_interrupts(signals):
            result = main(argv)
    except (Interrupted, KeyboardInterrupt) as err:
        stop = as_interrupted(err)
        if debug:
            traceback.print_exc()
        if not getattr(stop, "reported", False) and not getattr(err, "reported", False):
            print(f"{prog}: {stop}", file=sys.stderr)
        _quiet_worker_deaths()
        sys.exit(stop.exit_code)
    except EXPECTED_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        if not debug:
            print(f"{prog}: (run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
