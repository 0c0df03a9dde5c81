"""``python -m camcore``: the ``camcore`` command."""
import sys

from camcore.cli import main

sys.exit(main())
