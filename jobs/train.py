"""Entry point that a Ray Job runs: ``python jobs/train.py CONFIG [--set k=v ...]``.

Inside a Ray Job, RAY_ADDRESS names the cluster, so the training joins it. The working directory
is the uploaded project folder; it is put on sys.path so that ``segdist`` imports without
installation.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segdist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
