"""`python -m e2e.gma`: the GMA rank entry point (`e2e.gma.entry.main`)."""

import sys

from e2e.gma.entry import main

sys.exit(main())
