"""``python -m forgeflow.host``: this host's engine daemon (``forgeflow engine run`` starts the same)."""

import sys

from forgeflow.host.server import main

sys.exit(main())
