import sys

from edge_lora.cli import main

sys.exit(main())
