"""`python -m ditlab.cli ...`, as Ray Job entrypoints call it."""

import sys

from ditlab.cli import main

sys.exit(main())
