import sys

from featurize.cli import main

if __name__ == "__main__":
    sys.exit(main())
