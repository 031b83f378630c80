"""The way out: who may read what.  The access core (core) is the one place
that checks a caller's scope (tenant, role, the user's own addresses) and
writes the audit record (audit); the HTTPS API (api), the `mailtresor`
command and the web UI are thin adapters over it.  Logins, tokens and
sessions (auth, users, ldap, tokens, sessions) turn a request into a
Principal (principal)."""
