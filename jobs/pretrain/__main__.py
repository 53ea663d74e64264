"""Entrypoint: `python -m jobs.pretrain --run-dir DIR --attempt N`."""

import sys

from jobs.pretrain.driver import main

if __name__ == "__main__":
    sys.exit(main())
