"""Progress lines with a rate and an ETA for long evaluation passes (FID feature extraction,
rFID/pFID, gFID sampling), and the warning for an ImageNet FID on too few samples.

An ImageNet gFID pass samples 50k images and an rFID/pFID pass runs 15 decodes per image: hours
on a small slice, during which a silent log looks hung. One rate-limited line
(``gFID samples: 1024/50000 images (2.0%), 85.3 img/s, ETA 09:34``) says how far it is; the
first batch, which includes the XLA compilation, is left out of the rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from absl import logging

#: ImageNet FIDs are reported over 50,000 images (ADM's evaluator, RAR, RobusTok); fewer give a
#: biased, higher FID that is not comparable with published numbers.
IMAGENET_FID_SAMPLES = 50_000


def format_duration(seconds: float) -> str:
    """``mm:ss`` below an hour, ``h:mm:ss`` above (ETAs of full ImageNet passes run to hours)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_progress(
    what: str, done: int, total: int | None, rate: float | None, unit: str = "images"
) -> str:
    """``what: done/total unit (p%), r img/s, ETA mm:ss``; parts without data are left out."""
    if total:
        line = f"{what}: {done}/{total} {unit} ({100.0 * done / total:.1f}%)"
    else:
        line = f"{what}: {done} {unit}"
    if rate is not None and rate > 0:
        line += f", {rate:.1f} {'img' if unit == 'images' else unit}/s"
        if total and done < total:
            line += f", ETA {format_duration((total - done) / rate)}"
    return line


class Progress:
    """Counts finished items of one pass and logs a progress line at most every ``every_s``.

    ``update(n)`` after each batch (n = real images in it, padding excluded); ``finish()`` logs
    the total and the time taken. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        *,
        unit: str = "images",
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[..., None] = logging.info,
    ):
        self.what, self.total, self.unit = what, total, unit
        self.every_s = every_s
        self.clock = clock
        self.log = log
        self.done = 0
        self.start = clock()
        self._first_done: tuple[float, int] | None = None  # (time, count) after batch 1
        self._last_log = self.start
        if total is None:
            self.log("%s: started", what)
        else:
            self.log("%s: %d %s to go", what, total, unit)

    @property
    def rate(self) -> float | None:
        """Items per second since the first batch (which includes compilation), if known."""
        if self._first_done is None:
            return None
        t0, n0 = self._first_done
        elapsed = self.clock() - t0
        return (self.done - n0) / elapsed if elapsed > 0 and self.done > n0 else None

    def line(self) -> str:
        return format_progress(self.what, self.done, self.total, self.rate, self.unit)

    def update(self, n: int) -> None:
        self.done += int(n)
        now = self.clock()
        if self._first_done is None:
            self._first_done = (now, self.done)
        if now - self._last_log >= self.every_s:
            self._last_log = now
            self.log("%s", self.line())

    def finish(self) -> None:
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self.log(
            "%s: %d %s in %s (%.1f %s/s overall)", self.what, self.done, self.unit,
            format_duration(elapsed), rate, "img" if self.unit == "images" else self.unit,
        )


def warn_if_few_samples(data_name: str | None, num_samples: int | None, what: str) -> bool:
    """Warns (and returns True) when an ImageNet FID (data name ``imagenet*``) uses fewer than
    :data:`IMAGENET_FID_SAMPLES` samples; ``num_samples=None`` means the whole split."""
    if not data_name or not str(data_name).lower().startswith("imagenet"):
        return False
    if num_samples is None or num_samples >= IMAGENET_FID_SAMPLES:
        return False
    logging.warning(
        "%s on %s uses %d samples, fewer than the %d of published ImageNet FIDs: the value is "
        "biased upwards and not comparable with the papers' numbers.",
        what, data_name, num_samples, IMAGENET_FID_SAMPLES,
    )
    return True
