"""The harnesses of the entry points: ``attack.py``'s (options, runner, stage sweep, tables),
``train.py``'s options (``train_cli``), and the plumbing both share: ``--config`` parsing and
run folders. The packages below it (attacks, datamodules, lightning_modules, callbacks) import
nothing from here.

Importing the package loads only ``user_errors``' ``UserError``; the harness modules are
imported by name.
"""

from user_errors import UserError

__all__ = ["UserError"]
