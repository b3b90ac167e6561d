"""Ray job entrypoint for ``imgpipe retrain``; it forwards its arguments unchanged.

Usage::

    ray job submit --working-dir . -- python -m jobs.retrain CONFIG --date YYYY-MM-DD [--set key=value]...

Same flags, output and exit codes as ``imgpipe retrain`` (see ``imgpipe retrain --help``).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
