import sys

from tcjepa.cli import main

sys.exit(main())
