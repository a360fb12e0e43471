"""Progress of long work, for people and for logs (it imports nothing of ours).

On a terminal: a tqdm bar.  Where output goes to a file or a pipe (CI, nohup, a notebook's log),
where a bar would print nothing or garbage: a plain line when the work starts, then every
``LOCDIFF_LOG_EVERY`` seconds (default 30) with the count, the rate and the time left, and one when
it ends, so that a log is never silent for long.  Progress goes to stderr; results (``write``) to
stdout.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional


def log_every_s() -> float:
    """Seconds between progress lines in logs: $LOCDIFF_LOG_EVERY, default 30."""
    try:
        return max(0.0, float(os.environ.get("LOCDIFF_LOG_EVERY", "30")))
    except ValueError:
        return 30.0


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``update(n)`` as work is done, ``set_postfix(loss=...)`` for the current figures, ``write(msg)`` for
    a result line, ``close()`` (or a ``with`` block) at the end.  ``enabled=False``: silent but ``write``."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 file=None):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled
        self._tty = enabled and hasattr(self.file, "isatty") and self.file.isatty()
        self._bar = None
        if self._tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, file=self.file, dynamic_ncols=True)
        self._t0 = self._last = time.monotonic()
        self._n0 = self.n
        self._postfix = ""
        self._every = log_every_s()
        if self.enabled and not self._tty:
            self._line("started" if not self.n else f"resumed at {self.n}/{self.total} {unit}")

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self._every:
            self._line()

    def set_postfix(self, **values) -> None:
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def write(self, msg: str) -> None:
        """A line of results, printed whether or not progress is shown (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, msg: str) -> None:
        """A line of progress information (stderr), shown only when progress is."""
        if self._bar is not None:
            self._bar.write(msg, file=self.file)
        elif self.enabled:
            print(msg, file=self.file, flush=True)

    def _line(self, what: Optional[str] = None) -> None:
        now = time.monotonic()
        self._last = now
        if what is None:
            elapsed, done = now - self._t0, self.n - self._n0
            rate = done / elapsed if elapsed > 0 else 0.0
            left = (self.total - self.n) / rate if rate > 0 else float("nan")
            pct = 100.0 * self.n / self.total if self.total else 100.0
            what = (f"{self.n}/{self.total} {self.unit} ({pct:.0f}%), {rate:.3g} {self.unit}/s, elapsed "
                    f"{_hms(elapsed)}, left {_hms(left) if left == left else '?'}")
        print(f"{self.desc}: {what}" + (f", {self._postfix}" if self._postfix else ""), file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._last is not None:
            self._line(f"done, {self.n}/{self.total} {self.unit} in {_hms(time.monotonic() - self._t0)}")
            self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Progress", "log_every_s"]
