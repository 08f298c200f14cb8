"""The training and scoring service around :mod:`blayers`."""

from . import stages  # noqa: F401  (first: the jobs' start-up clock starts at this import)
