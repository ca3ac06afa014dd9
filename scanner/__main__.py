"""``python -m scanner`` runs the waferscope command line."""

from .cli import main

main()
