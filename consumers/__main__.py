import sys

from consumers._cli import main

sys.exit(main())
