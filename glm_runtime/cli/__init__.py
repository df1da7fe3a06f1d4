"""The ``glmrt`` command line. Each subcommand lives in its own module of this package
and is listed in :data:`glm_runtime.cli.main.COMMANDS`."""
