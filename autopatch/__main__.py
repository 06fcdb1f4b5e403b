"""``python -m autopatch`` runs the command line."""

import sys

from autopatch.cli import main

sys.exit(main())
