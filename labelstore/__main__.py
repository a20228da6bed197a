import sys

from labelstore.cli import main

sys.exit(main())
