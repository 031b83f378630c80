"""The archive's lifecycle: what must go, what must stay, and the proof.

    state.py        lifecycle.db: per tenant the retention rules, legal
                    holds and four-eyes deletion requests (one encrypted
                    document, as users.db)

The parts that decide (retention, holds, requests, classification, GDPR,
evidence) each have a module here; the access layer (mailtresor.access)
checks who may ask and writes the audit record, the archive layer
(mailtresor.archive) does the deleting.  docs/LIFECYCLE.md is the guide,
docs/COMPLIANCE.md maps the law to the features and their tests.
"""
