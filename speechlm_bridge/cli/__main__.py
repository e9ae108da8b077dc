import sys

from speechlm_bridge.cli import main

sys.exit(main())
