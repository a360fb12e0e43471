"""Console script ``locdiff`` (placeholder until the model issue lands its subcommands)."""
import sys


def main(argv=None) -> int:
    print("locdiff: no subcommands yet", file=sys.stderr)
    return 0
