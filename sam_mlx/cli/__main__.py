"""``python -m sam_mlx.cli``: the ``sam-mlx`` command."""

import sys

from . import main

sys.exit(main())
