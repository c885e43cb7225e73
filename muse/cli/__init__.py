"""The `muse` command: a thin typer layer over the Python API in `muse/__init__.py`.

Each module registers its commands on the one `app` in `muse.cli.common`.
"""

from muse.cli import assistant, core, training  # noqa: F401  (registers the commands)
from muse.cli.common import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
