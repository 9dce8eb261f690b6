"""``python -m xtoken.paper LAUNCH.json``: one paper-scale run on this process (torchrun starts one per GPU)."""

import sys

from .grid import main

sys.exit(main())
