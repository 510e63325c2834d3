import sys

from pneumomap.cli import main

sys.exit(main())
