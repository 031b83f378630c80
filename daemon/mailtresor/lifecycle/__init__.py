"""The archive's lifecycle: what must go, what must stay, and the proof.

    state.py        lifecycle.db: per tenant the retention rules, legal
                    holds and four-eyes deletion requests (one encrypted
                    document, as users.db)
    protect.py      THE precedence: a hold beats everything, then the
                    longest minimum, then the shortest maximum; evaluated
                    against the indexes when asked, never stamped at ingest
    retention.py    rules (validated), the plan (what would go, what is
                    kept and why), the run in bounded batches
    job.py          the daily job: retention, then compaction of closed months
    holds.py        legal holds by query and/or ids; lifted, never deleted
    requests.py     four-eyes deletion requests (GDPR Art. 17)
    gdpr.py         subject access / portability report, Art. 30 records
    evidence.py     the live proof an auditor asks for

The access layer (mailtresor.access: retention.py, holds.py, tags.py,
gdpr.py) checks who may ask and writes the audit record; the archive layer
does the changing (archive/deleter.py deletes with tombstones,
archive/classify.py tags at archive time, archive/casetags.py keeps case
tags, archive/compact.py reclaims space).  docs/LIFECYCLE.md is the guide,
docs/COMPLIANCE.md maps the law to the features and their tests.
"""
