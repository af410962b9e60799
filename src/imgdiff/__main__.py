"""``python -m imgdiff demo`` (see :mod:`imgdiff.demo`)."""

from imgdiff.demo import main

if __name__ == "__main__":
    main()
