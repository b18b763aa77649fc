"""``python -m aleatoria`` is the ``aleatoria`` command."""

import sys

from aleatoria.cli import main

sys.exit(main())
