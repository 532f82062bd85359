"""The user-error family, under its old name: it lives in ``user_errors`` (the ground floor every
package imports); code outside this project that imported it from here keeps working."""

from user_errors import CheckpointError, CompositionError, DataError, UserError

__all__ = ["CheckpointError", "CompositionError", "DataError", "UserError"]
