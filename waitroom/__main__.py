"""``python -m waitroom`` runs the console script."""

import sys

from waitroom.cli import main

sys.exit(main())
