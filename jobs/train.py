"""Ray job entrypoint for ``imgpipe train``; it forwards its arguments unchanged.

Usage::

    ray job submit --working-dir . -- python -m jobs.train CONFIG [--set key=value]... [--summary FILE]

Same flags, output and exit codes as ``imgpipe train`` (see ``imgpipe train --help``).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
