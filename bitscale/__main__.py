"""``python -m bitscale``: the ``bitscale`` command, for environments whose scripts folder
is not on PATH."""

from __future__ import annotations

import sys

from bitscale.cli import main

sys.exit(main())
