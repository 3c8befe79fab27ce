"""`python -m asymkd ...`: the same CLI as the `asymkd` console script."""

import sys

from .cli import main

sys.exit(main())
