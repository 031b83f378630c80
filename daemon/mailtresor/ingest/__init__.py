"""The way in: the TLS-only SMTP journaling relay (relay), the durable
encrypted spool both the relay and the milter write to (spool), and the
SMTP replies a spool failure becomes (replies).  Nothing here parses mail
beyond the SMTP envelope: what is accepted is spooled as received."""
