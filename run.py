"""autorad-jax from a checkout: `python run.py [SUBCOMMAND] [--flags]`, the same command line as the installed
`autorad` console script (see autorad_jax/cli.py; `python run.py --help` lists the subcommands and flags)."""

from autorad_jax.cli import SUBCOMMANDS, run  # noqa: F401  (SUBCOMMANDS: the subcommands, for tools and tests)

if __name__ == "__main__":
    run()
