import sys

from ferlab.cli import main

sys.exit(main())
