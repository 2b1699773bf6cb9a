"""``python -m lohakr info FILE`` / ``python -m lohakr demo``."""

import sys

from .loaders.cli import main

sys.exit(main())
