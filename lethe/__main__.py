"""`python -m lethe`: the same as the `lethe` command."""

from lethe.cli import main

if __name__ == "__main__":
    main()
