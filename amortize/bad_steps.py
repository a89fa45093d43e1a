"""Bad training steps: a step whose loss or gradient is not finite, or whose guide or model raised a
distribution argument error on non-finite values (a NaN inside the guide), is skipped, not fatal.

:func:`bad_step_error` tells such an error from a real one and names the site; :class:`BadSteps`
counts the skipped steps (in a row, in all, per site), logs each, and words the
:class:`~amortize.errors.TrainingError` of a run that cannot continue and the report at its end.
"""

from __future__ import annotations

import logging
import re

__all__ = ["BadSteps", "bad_step_error", "guide_site", "NON_FINITE"]

log = logging.getLogger("amortize.train")  # the training loop's messages

NON_FINITE = ("Expected parameter", "found invalid values", "to satisfy the constraint")


def guide_site(err: BaseException) -> str | None:
    """The sample site a distribution argument error was raised at (the innermost Pyro message
    on the traceback), or None."""
    site, tb = None, err.__traceback__
    named = re.search(r"at site '([^']+)'", str(err))  # Pyro's log_prob errors name it
    if named:
        return named.group(1)
    while tb is not None:
        msg = tb.tb_frame.f_locals.get("msg")
        if isinstance(msg, dict) and msg.get("type") == "sample" and isinstance(msg.get("name"), str):
            site = msg["name"]
        tb = tb.tb_next
    return site


def bad_step_error(err: BaseException) -> str | None:
    """A description of ``err`` when it is a distribution argument check failing on non-finite values
    (a NaN inside the guide or model: a bad step), else None (a real error, raised)."""
    if not isinstance(err, ValueError) or not any(m in str(err) for m in NON_FINITE):
        return None
    site = guide_site(err)
    first = str(err).splitlines()[0][:200]
    return f"non-finite value at site '{site}' ({first})" if site else f"non-finite value ({first})"


class BadSteps:
    """Skipped training steps of one call of :func:`~amortize.train.train`.

    Args:
        max_in_a_row: consecutive bad steps that stop the run (``TrainConfig.max_bad_steps``).

    Attributes:
        in_a_row: bad steps since the last good one (the loop resets it).
        total: bad steps in all.
        sites: ``{site: count}`` of the bad steps whose error named a site.
    """

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = int(max_in_a_row)
        self.in_a_row = self.total = 0
        self.sites: dict[str, int] = {}
        self.last = ""

    def skip(self, step: int, why: str) -> None:
        """Count and log bad step ``step`` (``why``: what was not finite, and where)."""
        self.in_a_row += 1
        self.total += 1
        self.last = why
        named = re.match(r"non-finite value at site '([^']+)'", why)
        if named:
            self.sites[named.group(1)] = self.sites.get(named.group(1), 0) + 1
        log.warning("step %d: %s; step skipped (%d in a row, %d so far)", step, why, self.in_a_row, self.total)

    def message(self, step: int) -> str:
        """The TrainingError of a run stopped at ``step`` by too many bad steps in a row (naming the site)."""
        return (
            f"training stopped at step {step}: {self.in_a_row} consecutive non-finite losses or gradients"
            f" (max_bad_steps={self.max_in_a_row}); last: {self.last}"
        )

    def report(self, steps: int) -> None:
        """One warning at the end of a call of ``steps`` steps that skipped any: how many, per site."""
        if not self.total:
            return
        where = ", ".join(f"site '{k}': {v}" for k, v in sorted(self.sites.items(), key=lambda kv: -kv[1]))
        log.warning(
            "training: %d of %d steps left out for a non-finite loss, gradient or guide value%s",
            self.total,
            steps,
            f" ({where})" if where else "",
        )
