"""The experiment harness of ``attack.py`` (options, runner, stage sweep, tables) and the plumbing
both entry points share: user-facing errors, ``--config`` parsing and run folders.

Importing the package loads only ``errors``, which every package raises; the harness modules are
imported by name.
"""

from user_errors import UserError

__all__ = ["UserError"]
