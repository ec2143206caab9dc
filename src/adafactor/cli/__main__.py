"""``python -m adafactor.cli``: the ``adafactor`` command where its script is not on PATH."""

import sys

from . import main

sys.exit(main())
