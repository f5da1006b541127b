"""`python -m iota_orchestrator --data-dir DIR [--port 0]`: the same server as `iota orchestrator serve`."""

import sys

from iota_orchestrator.serve import main

sys.exit(main())
