"""`python -m sparse_detr.sweep`: the same as `sparse-detr-sweep`."""
import sys

from sparse_detr.sweep.command import main

sys.exit(main())
