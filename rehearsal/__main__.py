"""``python -m rehearsal``: the command line of the rehearsal tools."""

from __future__ import annotations

import sys

from rehearsal.cli import main

if __name__ == "__main__":
    sys.exit(main())
