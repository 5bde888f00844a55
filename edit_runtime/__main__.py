"""``python -m edit_runtime`` = the ``edit-runtime`` command."""
import sys

from edit_runtime.cli import main

sys.exit(main())
