"""`python -m tinyllm` (and `torchrun ... -m tinyllm`): the `tinyllm` command."""

from tinyllm.cli import main

main()
