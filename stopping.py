"""Stopping on SIGTERM and SIGINT (what Ray, a cluster's preemption, ``kill`` and Ctrl-C send), within seconds, in
every phase, keeping what is complete.

Each script's ``main`` is wrapped in ``stop_on_signals``. The first signal only sets a flag; the long loops look at
it between steps (``check``): a token step of ``generate`` (``sampling.GenerationMonitor``), a decode step of the
verifier, a row of tokenizing, a training or validation batch (``module.PostTrainingModule``), a batch of a script.
The step in flight is dropped, never half-written: checkpoints and output rows are only ever written whole
(``checkpoint_io.AtomicCheckpointIO``, ``resumable.append_rows``). The script then exits with 128 + the signal's
number (143 for SIGTERM, 130 for SIGINT) after one line saying what was kept. A second signal stops at once.

Lightning's own SIGTERM handler, installed while it fits or validates, calls this one too (it keeps the handler it
finds), so its flag and ours are raised together. A Ray job's driver gives the signals back to Ray before Ray starts
(``release``): Ray stops its workers itself.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state: dict = {"signum": None, "script": None, "previous": None, "kept": None}


class Stopped(BaseException):
    """Raised at a step boundary once SIGTERM or SIGINT was received. A BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` on the way swallows it."""


def requested() -> bool:
    """Whether SIGTERM or SIGINT was received since the script started."""
    return _state["signum"] is not None


def check() -> None:
    """Raise ``Stopped`` if a stop was requested: call it between steps."""
    if _state["signum"] is not None:
        raise Stopped(signal.Signals(_state["signum"]).name)


def keep(what: str | Callable[[], str]) -> None:
    """Say what a stop keeps (the text, or a function giving it at the time), for the line printed on the way out."""
    _state["kept"] = what


def _handler(signum: int, frame) -> None:
    if _state["signum"] is not None:  # the second signal: stop now, wherever this is
        raise KeyboardInterrupt
    _state["signum"] = signum
    print(f"\n{_state['script']}: {signal.Signals(signum).name} received, stopping after the current step "
          "(send it again to stop at once)", file=sys.stderr, flush=True)


def release() -> None:
    """Give SIGTERM and SIGINT back to the handlers they had before ``stop_on_signals`` (a Ray driver: Ray's own)."""
    previous, _state["previous"] = _state["previous"], None
    for sig, handler in (previous or {}).items():
        if handler is not None:  # None: set outside Python, which Python cannot put back
            signal.signal(sig, handler)


def stop_on_signals(script: str) -> Callable:
    """Decorate a script's ``main``: on SIGTERM or SIGINT it stops at the next step and exits with 128 + the signal's
    number, after a line saying what was kept (see ``keep``). Handlers are installed only in the main thread and put
    back when ``main`` returns, so calling ``main`` from a test leaves the test process as it was."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread() or _state["script"] is not None:
                return main(*args, **kwargs)  # a nested main (a script calling another) or another thread
            _state.update(signum=None, script=script, kept=None,
                          previous={sig: signal.getsignal(sig) for sig in SIGNALS})
            for sig in SIGNALS:
                signal.signal(sig, _handler)
            try:
                return main(*args, **kwargs)
            except BaseException:
                signum = _state["signum"]
                if signum is None:
                    raise
                kept = _state["kept"]
                kept = kept() if callable(kept) else kept
                print(f"{script}: stopped by {signal.Signals(signum).name}; "
                      f"{'kept ' + kept if kept else 'nothing was written yet'}", file=sys.stderr, flush=True)
                raise SystemExit(128 + signum) from None
            finally:
                release()
                _state.update(signum=None, script=None, kept=None)

        return wrapper

    return decorate
