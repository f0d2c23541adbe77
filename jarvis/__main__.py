"""``python -m jarvis``: same as the ``jarvis`` console script."""

import sys

from jarvis.cli.main import main

sys.exit(main())
