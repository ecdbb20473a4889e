"""``python -m edgemoe``: same as the ``edgemoe`` console script."""

from edgemoe.cli import main

if __name__ == "__main__":
    main()
