import sys

from qtulu.cli import main

sys.exit(main())
