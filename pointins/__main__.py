"""``python -m pointins``: the ``pointins`` command."""

import sys

from .cli import main

sys.exit(main())
