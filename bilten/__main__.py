import sys

from bilten.cli import main

sys.exit(main())
