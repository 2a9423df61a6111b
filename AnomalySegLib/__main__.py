"""``python -m AnomalySegLib`` runs the ``anomalyseg`` command line."""

import sys

from .cli.commands import main

sys.exit(main())
