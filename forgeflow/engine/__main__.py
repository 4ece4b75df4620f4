import sys

from forgeflow.engine.server import main

sys.exit(main())
