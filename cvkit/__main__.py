"""``python -m cvkit ...`` runs the ``cvkit`` command."""
import sys

from cvkit.cli import main

sys.exit(main())
