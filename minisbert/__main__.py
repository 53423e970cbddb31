import sys

from minisbert.cli import main

sys.exit(main())
