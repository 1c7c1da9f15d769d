import sys

from hf_vlm.cli import main

sys.exit(main())
