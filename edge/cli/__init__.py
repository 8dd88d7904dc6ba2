"""The ``edge`` command line (see ``edge.cli.main``)."""
