"""Access to the archive: the core, the HTTPS API, logins, and the audit trail."""
