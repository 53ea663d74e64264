"""`python -m jobs.pretrain --run-dir DIR --attempt N`: see jobs/pretrain/entry.py."""

import sys

from jobs.pretrain.entry import main

if __name__ == "__main__":
    sys.exit(main())
