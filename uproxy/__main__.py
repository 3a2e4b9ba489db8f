"""``python -m uproxy`` is the ``uproxy`` command."""

import sys

from uproxy.cli import main

sys.exit(main())
