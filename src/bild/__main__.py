"""`python -m bild`: the same as the `bild` command."""

import sys

from bild.cli import main

sys.exit(main())
