"""`python -m adamd.server.cli`: the `adamd` command."""

import sys

from adamd.server.cli.main import main

sys.exit(main())
