"""``python -m nkat.supervisor`` is ``nkat-supervise``."""

import sys

from nkat.supervisor.ops.cli import main

sys.exit(main())
