"""argparse types shared by the project's command lines: a bad value is refused at parse time,
naming the flag. They live in runtime/ (which imports nothing of export/), so export's CLIs
import them from here instead of keeping a copy."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)  # argparse reports the ValueError as "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value
