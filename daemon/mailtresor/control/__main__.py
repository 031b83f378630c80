"""`python3 -m mailtresor.control`: the control endpoint."""

import sys

from mailtresor.control.server import main

sys.exit(main())
