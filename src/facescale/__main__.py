"""`python -m facescale` runs the command line."""

from facescale.cli import main

if __name__ == "__main__":
    main()
