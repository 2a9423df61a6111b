"""The ``anomalyseg`` command line: subcommands, argument types, ``evaluate`` and ``demo``."""
