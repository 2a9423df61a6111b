"""``python -m AnomalySegLib.worker REQUEST.json`` runs one request (:func:`.server.main`)."""

import sys

from .server import main

sys.exit(main())
