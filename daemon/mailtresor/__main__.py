"""`python3 -I -m mailtresor ARGS`: the administration command.  The
installed /usr/bin/mailtresor (daemon/bin/mailtresor.c) runs this for
every command the daemon does not answer."""

import sys

from mailtresor.cli.main import main

sys.exit(main())
