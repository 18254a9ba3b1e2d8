import sys

from specem_fast.cli import main

sys.exit(main())
