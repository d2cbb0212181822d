import sys

from producers._cli import main

sys.exit(main())
