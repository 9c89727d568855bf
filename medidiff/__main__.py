"""``python -m medidiff`` is the ``medidiff`` command (so ``torchrun -m medidiff`` works)."""

import sys

from medidiff.workflows.cli import main

sys.exit(main())
