"""The way into the archive for people and machines.

access/ holds who may read what and how they prove it: the principal and its
role table (principal.py), local users with argon2id hashes and a TOTP second
factor (users.py), API tokens for machines (tokens.py), in-memory sessions and
login throttling (sessions.py), per-tenant LDAP directories (ldap.py) and the
Authenticator that ties them together (auth.py); beside them the access core
that alone checks a caller's scope and writes the audit record, the audit
trail, and the HTTPS API that adapts HTTP to the core.
"""
