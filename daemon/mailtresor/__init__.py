"""mailtresor: an email archiving appliance.

Ingest (relay, milter) ends at the spool; the archive begins there.
"""

__version__ = "0.1.0"

# The configuration file, and the variable that names another one.  Here
# rather than in mailtresor.config, which re-exports them, so that
# `mailtresor --help` names them without importing the configuration schema
# (about half of what --help costs).
CONFIG_PATH = "/etc/mailtresor/mailtresor.toml"
CONFIG_ENV_VAR = "MAILTRESOR_CONFIG"
# [appliance] runtime_directory when the file does not say.
RUNTIME_DIRECTORY = "/run/mailtresor"


def private_umask() -> None:
    """umask 077 for the daemon and the command line: whatever they (or a
    library that takes no file mode, Xapian) create -- spool, store, index,
    backup -- is readable by its owner only, even when an administrator runs
    `mailtresor reindex` or `restore` from a root shell with umask 022.  The
    store also makes its directories and files with explicit private modes;
    this covers every file a library makes on its own."""
    import os
    os.umask(0o077)


def no_core_dumps() -> None:
    """Set this process's core size limit to zero (soft and hard), so that a
    crash of a process holding keys or mail never writes them to a disk
    (the units also say LimitCORE=0; this covers a start by hand)."""
    import resource
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
