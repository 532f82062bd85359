"""Shared plumbing of the entry points: user-facing errors, options and run folders."""

from experiment.errors import UserError

__all__ = ["UserError"]
