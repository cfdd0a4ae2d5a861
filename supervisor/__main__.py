"""``python -m nkat.supervisor`` is ``nkat-supervise``."""

import sys

from nkat.supervisor.cli import main

sys.exit(main())
