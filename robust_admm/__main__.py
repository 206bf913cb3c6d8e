"""`python -m robust_admm VERB [flags]`: the `robust-admm` command (robust_admm/cli.py)."""
from robust_admm.cli import main

main()
