import sys

from ferlab.apps.cli import main

sys.exit(main())
