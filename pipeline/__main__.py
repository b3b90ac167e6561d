"""``python -m pipeline`` is the same program as ``imgpipe``."""

import sys

from pipeline.cli import main

sys.exit(main())
