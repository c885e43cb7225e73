"""The `muse` command: a thin typer layer over the Python API in `muse/__init__.py`.

Each module registers its commands on the one `app` in `muse.cli.common`.
"""

from muse.cli import (  # noqa: F401  (importing a module registers its commands)
    assistant, compress, core, create, eval, explain, extract, kb, safety, serve, training, write,
)
from muse.cli.common import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
