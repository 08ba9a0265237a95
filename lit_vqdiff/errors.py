"""Errors a user acts on; the CLI turns each into a one-line message and an exit status."""

from __future__ import annotations


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
