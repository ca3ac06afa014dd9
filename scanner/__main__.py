"""``python -m scanner`` runs the waferscope command line."""

from scanner.cli import main

main()
