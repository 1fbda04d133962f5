import sys

from megatron_dil.iterate.cli import main

sys.exit(main())
