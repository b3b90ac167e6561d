"""Ray job entrypoint for ``imgpipe predict``; it forwards its arguments unchanged.

Usage::

    ray job submit --working-dir . -- python -m jobs.predict --model MODEL --input SRC --output DST [--config CONFIG] [--set key=value]...

Same flags, output and exit codes as ``imgpipe predict`` (see ``imgpipe predict --help``).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
