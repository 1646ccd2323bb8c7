"""``python -m gateway`` is the ``obs-gateway`` command."""

import sys

from gateway.cli import main

sys.exit(main())
