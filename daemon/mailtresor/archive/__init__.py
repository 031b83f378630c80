"""From the spool to the archive: the archiver (spool -> parse -> route ->
store -> index), the confined parser children (parse, parseworker,
confine), Exchange journal reports (journal), the encrypted LMDB shards
with their chain and seals, backup and verification (store), the Xapian
index (index) and RFC 3161 timestamps on seals (tsa)."""
