import sys

from broker_proxy._cli import main

sys.exit(main())
