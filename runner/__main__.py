"""`python -m runner` is the same as `t2i`."""

from .cli import main

main()
