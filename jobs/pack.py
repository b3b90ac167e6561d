"""Ray job entrypoint for ``imgpipe pack``; it forwards its arguments unchanged.

Usage::

    ray job submit --working-dir . -- python -m jobs.pack SRC DST [--shard-rows N] [--val F] [--test F] [--seed S] [--config CONFIG]

Same flags, output and exit codes as ``imgpipe pack`` (see ``imgpipe pack --help``).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]]))
