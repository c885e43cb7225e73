"""`python -m muse ...` runs the `muse` command (for environments where the script is not on PATH)."""

from muse.cli import main

if __name__ == "__main__":
    main()
