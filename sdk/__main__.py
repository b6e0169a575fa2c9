import sys

from edgeship.cli import main

if __name__ == "__main__":  # a spawned export lane imports this module as __mp_main__
    sys.exit(main())
