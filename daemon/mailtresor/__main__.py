"""`python3 -m mailtresor ARGS`: the administration command, as the
installed /usr/bin/mailtresor (a console script) runs it."""

import sys

from mailtresor.cli.main import main

sys.exit(main())
