import sys

from vlmd.cli import main

sys.exit(main())
