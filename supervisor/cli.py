"""Command line entry point (placeholder until the CLI lands)."""

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nkat-supervise")
    parser.parse_args(argv)
    return 0
