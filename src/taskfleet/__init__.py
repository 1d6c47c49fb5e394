"""taskfleet: run work on a fleet of managed computers and tell the truth about it."""

__version__ = "0.1.0"
