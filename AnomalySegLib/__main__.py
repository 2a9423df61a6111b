"""``python -m AnomalySegLib`` runs the ``anomalyseg`` command line."""

import sys

from .cli import main

sys.exit(main())
