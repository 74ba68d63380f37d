"""``python -m edgeops_toolchain`` runs the ``edgeops`` command."""

from edgeops_toolchain.cli import main

main()
