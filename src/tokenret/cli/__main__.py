"""``python -m tokenret.cli`` (and ``torchrun -m tokenret.cli``): the ``tokenret`` command."""

import sys

from tokenret.cli import main

sys.exit(main())
