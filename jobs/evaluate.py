"""Ray job entrypoint for ``imgpipe evaluate``; it forwards its arguments unchanged.

Usage::

    ray job submit --working-dir . -- python -m jobs.evaluate --model MODEL --data MANIFEST [--split test] [--config CONFIG]

Same flags, output and exit codes as ``imgpipe evaluate`` (see ``imgpipe evaluate --help``).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
