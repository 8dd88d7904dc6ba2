"""The outbox database schema (one SQLite file, WAL).

Tables:
- ``events``        one row per stored event (body = canonical JSON); deleted when no
                    delivery row and no dead letter references it any more.
- ``deliveries``    one row per (event, sink) still to deliver. Keyed (seq, sink) so an event's
                    rows are found by seq; ``deliveries_ready`` (partial: rows not done)
                    serves the lease scan in priority order; ``deliveries_key`` serves
                    per-key FIFO checks; ``deliveries_retrying`` (partial: only rows that
                    failed) serves the retrying/unrouted counts of ``/status`` without a
                    full scan. A delivered row is not deleted at once: it is marked
                    ``done`` (one page in seq order, beside the audit row that records the
                    delivery) and swept later with its event, many rows per transaction in
                    seq order (``queries.sweep_delivered``): deleting it at once touched a
                    page of every index for every event, and ``deliveries_key`` is ordered
                    by lot, so a batch's deletes landed on as many pages as it had lots.
                    Every reader treats a ``done`` row as gone; ``deliveries_done``
                    (partial) finds the rows to sweep.
- ``dead_letters``  deliveries the receiver refused for good, with status, reason and body.
- ``dedupe``        a source's dedupe key → the event id of its first copy. ``scope`` 1: an
                    identity key, kept ``dedupe_window_s``; 0: a content hash, matched only
                    for a redelivery and kept only for the source's newest
                    ``redelivery_horizon`` messages (``dedupe_recent`` serves that prune).
- ``quarantine``    inbound records that could not become events, with the reason.
- ``audit``         append-only, hash-chained state log; ``seq`` is the monotonic
                    sequence, ``hash`` chains each row to the one before
                    (``edge.outbox.audit``).
- ``audit_checkpoints``  the chain's genesis and one row per prune (count, seq range, the
                    hash of each pruned run's last row), chained among themselves.
- ``lots``          one row per lot the quality logic has seen: state (unknown, hold,
                    quarantine, rejected, released), hold episode number, supplier, the
                    last event per type, who decided and why (``edge.outbox.lots``).
                    Written in the transaction of the events that change it; released
                    and rejected lots are removed after ``quality.lot_retention_days``.
- ``capa_counts``   per CAPA rule and group (supplier, characteristic …): the
                    nonconformances counted in the current window, the last request.
- ``meta``          schema version, site, counters that must survive restarts:
                    ``last_seq`` — events take ``seq`` above it, so a seq freed by a
                    delivery or expiry is never given to another event (a lease completing
                    late can only ever touch its own rows). Dead-letter ids never repeat
                    either (AUTOINCREMENT). ``sink_pause:<sink>`` and
                    ``sink_retry_after:<sink>`` — a sink's pauses that outlive a restart
                    (``edge.outbox.pauses``). ``quality_rev`` — the revision of the last
                    write to ``lots`` / ``capa_counts``.

Leases are not stored: they live in memory in ``Outbox`` and vanish with the process, so a
crash can never leave rows stuck as "in flight".
"""

# 1: events.sha256 held the SHA-256 of the event's data
# 2: events.sha256 holds the SHA-256 of the stored envelope (checked before every send)
# 3: identities are never reused (meta.last_seq, dead_letters AUTOINCREMENT); dedupe.scope;
#    dead_letters_key serves the parked keys of the lease scan
# (``lots`` and ``capa_counts`` came later without a new version: tables of their own,
# created when missing, that an older gateway ignores)
# 4: the audit trail is hash-chained (audit.hash, audit_checkpoints); rows of an older
#    file are chained at the upgrade from a genesis checkpoint that says so
# 5: deliveries.done — delivered rows are marked and swept later in seq order
#    (deliveries_ready becomes partial, deliveries_done finds the rows to sweep);
#    no audit_key index: ``trace --key`` reads the trail instead of every ingest
#    writing a page per lot
SCHEMA_VERSION = 5

DEAD_LETTERS_TABLE = """
CREATE TABLE IF NOT EXISTS dead_letters(
  id            INTEGER PRIMARY KEY AUTOINCREMENT,
  seq           INTEGER NOT NULL,
  sink          TEXT NOT NULL,
  event_id      TEXT NOT NULL,
  type          TEXT NOT NULL,
  class         INTEGER NOT NULL,
  ordering_key  TEXT,
  status        INTEGER,
  reason        TEXT NOT NULL,
  response_body TEXT,
  attempts      INTEGER NOT NULL,
  dead_at       REAL NOT NULL
);
"""

DDL = """
CREATE TABLE IF NOT EXISTS meta(
  key   TEXT PRIMARY KEY,
  value TEXT
);
CREATE TABLE IF NOT EXISTS events(
  seq          INTEGER PRIMARY KEY,
  id           TEXT NOT NULL UNIQUE,
  type         TEXT NOT NULL,
  class        INTEGER NOT NULL,
  ordering_key TEXT,
  source       TEXT NOT NULL,
  received_at  REAL NOT NULL,
  sha256       TEXT NOT NULL,   -- SHA-256 of body, checked before every send
  body         BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries(
  seq          INTEGER NOT NULL,
  sink         TEXT NOT NULL,
  class        INTEGER NOT NULL,
  ordering_key TEXT,
  next_at      REAL NOT NULL DEFAULT 0,
  attempts     INTEGER NOT NULL DEFAULT 0,
  last_error   TEXT,
  done         INTEGER NOT NULL DEFAULT 0,  -- 1: delivered, waiting for the sweep
  PRIMARY KEY(seq, sink)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_ready ON deliveries(sink, class, seq) WHERE done = 0;
CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries(seq) WHERE done = 1;
CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries(sink, ordering_key, seq)
  WHERE ordering_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_retrying ON deliveries(sink)
  WHERE attempts > 0 OR last_error IS NOT NULL;
""" + DEAD_LETTERS_TABLE + """
CREATE INDEX IF NOT EXISTS dead_letters_seq ON dead_letters(seq);
CREATE INDEX IF NOT EXISTS dead_letters_event ON dead_letters(event_id);
CREATE INDEX IF NOT EXISTS dead_letters_key ON dead_letters(sink, ordering_key)
  WHERE ordering_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS dedupe(
  source     TEXT NOT NULL,
  key        TEXT NOT NULL,
  event_id   TEXT NOT NULL,
  created_at REAL NOT NULL,
  scope      INTEGER NOT NULL DEFAULT 1,
  PRIMARY KEY(source, key)
);
CREATE INDEX IF NOT EXISTS dedupe_recent ON dedupe(source, scope);
CREATE TABLE IF NOT EXISTS quarantine(
  id          INTEGER PRIMARY KEY,
  received_at REAL NOT NULL,
  source      TEXT NOT NULL,
  reason      TEXT NOT NULL,
  detail      TEXT,
  raw         BLOB,
  meta        TEXT
);
CREATE TABLE IF NOT EXISTS audit(
  seq          INTEGER PRIMARY KEY AUTOINCREMENT,
  ts           TEXT NOT NULL,
  event_id     TEXT,
  sink         TEXT,
  state        TEXT NOT NULL,
  actor        TEXT NOT NULL DEFAULT 'gateway',
  reason       TEXT,
  ordering_key TEXT,
  detail       TEXT,
  hash         TEXT             -- SHA-256 of the previous row's hash and this row
);
CREATE TABLE IF NOT EXISTS audit_checkpoints(
  id         INTEGER PRIMARY KEY AUTOINCREMENT,
  ts         TEXT NOT NULL,
  kind       TEXT NOT NULL,     -- genesis | pruned
  reason     TEXT,
  count      INTEGER NOT NULL,  -- entries pruned
  first_seq  INTEGER,
  last_seq   INTEGER NOT NULL,  -- genesis: the seq the chain starts after
  last_hash  TEXT NOT NULL,     -- hash of the entry at last_seq
  ranges     TEXT,              -- JSON [[first seq, last seq, hash of the last], ...]
  detail     TEXT,
  hash       TEXT NOT NULL,     -- SHA-256 of the previous checkpoint's hash and this one
  signature  TEXT               -- HMAC-SHA256 of hash (audit.checkpoint_key_file)
);
CREATE INDEX IF NOT EXISTS audit_event ON audit(event_id) WHERE event_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS lots(
  lot_id        TEXT PRIMARY KEY,
  state         TEXT NOT NULL,   -- unknown | hold | quarantine | rejected | released
  episode       INTEGER NOT NULL,
  supplier      TEXT,
  info          TEXT,            -- JSON: material, supplier_lot, purchase_order of a receipt
  first_seen    REAL NOT NULL,
  opened_at     REAL,
  decided_at    REAL,
  decided_by    TEXT,
  reason        TEXT,
  failures      INTEGER NOT NULL,
  last_type     TEXT,
  last_event_id TEXT,
  last_at       REAL,
  last          TEXT,            -- JSON {event type: [event id, epoch s]}
  pending       TEXT,            -- JSON: a failure still waiting for its episode
  updated_at    REAL NOT NULL,
  rev           INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lots_state ON lots(state, updated_at);
CREATE TABLE IF NOT EXISTS capa_counts(
  rule          TEXT NOT NULL,   -- CapaRule.key
  grp           TEXT NOT NULL,   -- JSON list of the values of the rule's `by` fields
  threshold     INTEGER NOT NULL,
  window_s      REAL NOT NULL,
  times         TEXT NOT NULL,   -- JSON [[time, lot, nonconformance id], ...]
  last_start    REAL,
  last_capa_id  TEXT,
  requests      INTEGER NOT NULL,
  updated_at    REAL NOT NULL,
  rev           INTEGER NOT NULL,
  PRIMARY KEY(rule, grp)
) WITHOUT ROWID;
"""
