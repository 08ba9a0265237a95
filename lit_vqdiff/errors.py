"""Errors a user acts on; the CLI turns each into a one-line message and an exit status."""

from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A configuration problem a user can fix; the CLI prints it and exits with status 2."""


class NonFiniteLossError(RuntimeError):
    """Raised after too many non-finite losses in a row (a checkpoint was saved first)."""


# Every reason a sample can be skipped for, as logged under data/skipped_<reason>.
SKIP_REASONS = (
    "missing_member",  # a member the stage needs is absent
    "bad_image",  # undecodable image
    "bad_audio",  # undecodable or empty sound
    "sample_rate",  # sound at a rate the config does not accept
    "bad_text",  # text that is not UTF-8, or json that does not parse
    "bad_label",  # cls that is not a non-negative integer, or one past data.num_classes
    "bad_codes",  # a token-cache member that is not an integer .npy array
    "truncated",  # a shard ended (or failed) before its planned samples
    "unreadable",  # a shard that could not be opened or read at all
)


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# Exit statuses of a run stopped by a signal, once what it can go on from is saved: a
# scheduler's or tool's request (SIGTERM: `timeout`, `scancel`, a pod stop; SIGUSR1: SLURM's
# warning before the time limit) ends cleanly, as a requeue expects; Ctrl-C (SIGINT) ends
# with the shell's 128 + 2, so that `make` and `&&` chains stop there.
STOP_STATUS = {"SIGTERM": 0, "SIGUSR1": 0, "SIGINT": 130}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Stopped(SystemExit):
    """A run told to stop by a signal; ``code`` is its exit status (``STOP_STATUS``) and
    ``message`` one line saying what was kept and how to go on.

    ``where`` names the phase it stopped in when that is not a training step, ``again`` a
    second Ctrl-C that did not wait for the step to end.
    """

    def __init__(self, signame: str, message: str = "", *, where: str = "", again: bool = False):
        super().__init__(STOP_STATUS.get(signame, 1))
        self.signame, self.where, self.again = signame, where, again
        self.message = message or " ".join(filter(None, [self.cause, where]))

    @property
    def cause(self) -> str:
        return f"stopped by {'a second ' if self.again else ''}{self.signame}"

    def during(self, what: str, outcome: str) -> "Stopped":
        """The same stop, its message naming the phase it ended (``what``) and what that left."""
        return Stopped(self.signame, f"{self.cause} {what}: {outcome}", where=what, again=self.again)

    def __str__(self) -> str:
        return self.message


class TrainingFailed(RuntimeError):
    """A run that could not go on (a data loader worker died, a checkpoint could not be
    written, too much bad data); the message names the cause, the checkpoint a resume
    starts from, and the command. The CLI prints it and exits with status 1."""


class RankZeroFailed(RuntimeError):
    """The rank that builds something every rank needs (the token cache, shapes-v1) failed;
    the others stop at once with its error instead of waiting for their deadline."""
