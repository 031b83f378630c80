"""mailtresor: an email archiving appliance.

Ingest (relay, milter) ends at the spool; the archive begins there.
"""

__version__ = "0.1.0"
