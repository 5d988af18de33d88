"""``python -m patchnet.cli`` (and ``torchrun ... -m patchnet.cli``) runs the command line."""

from . import main

main()
