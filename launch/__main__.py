"""`python -m launch ...` is the `civetta` command (handy under `mpirun`)."""

import sys

from launch.cli import main

sys.exit(main())
