"""Exceptions that carry a message a user can act on.

Everything the command line or the Slicer worker reports to a user derives from
:class:`AnomalySegError`; anything else escaping is a bug.
"""


class AnomalySegError(Exception):
    """Base class: the message is shown to the user as is (one line)."""


class InputError(AnomalySegError):
    """A volume cannot be used: missing, unreadable, not 3D, NaNs, empty brain mask..."""


class SettingError(InputError, ValueError):
    """A setting is outside its range (e.g. a percentile not strictly between 0 and 100).

    Also a ValueError, so code validating plain values can catch it as one.
    """


class ModelFileError(AnomalySegError):
    """A model file is missing, foreign, corrupt, or from a newer/older format version."""


class OutputError(AnomalySegError):
    """An output cannot be written: exists (without overwrite), or folder not writable."""


class Cancelled(AnomalySegError):
    """Raised inside long operations when the caller's cancel callback returns True."""
