"""``python -m itk_infer`` runs the command line."""

import sys

from itk_infer.cli import console

sys.exit(console())
