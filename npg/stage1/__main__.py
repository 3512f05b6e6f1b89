import sys

from npg.stage1 import main

sys.exit(main())
