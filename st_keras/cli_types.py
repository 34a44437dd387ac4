"""argparse types of the console commands (st-train, st-eval): each
refuses a bad value with a message that argparse prefixes with the
argument's name."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
  """argparse type: an int >= 1.

  Args:
    text: the argument's value.

  Returns:
    It as an int.

  Raises:
    argparse.ArgumentTypeError: not an integer, or below 1.
  """
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"must be an integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def ascending_ints(text: str) -> list:
  """argparse type: comma-separated positive ints, strictly ascending.

  Args:
    text: the argument's value, e.g. '512,1024,2048'.

  Returns:
    The ints.

  Raises:
    argparse.ArgumentTypeError: not integers, or not positive and ascending.
  """
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"must be comma-separated integers, got {text!r}") from None
  if any(v < 1 for v in values) or values != sorted(set(values)):
    raise argparse.ArgumentTypeError(
        f"must be positive and ascending, got {text!r}")
  return values
