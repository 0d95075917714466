package sqlite

// migrations are applied in order; migrations[i] brings the schema to
// version i+1. Never edit a released migration: append a new one.
//
// Portability: only types and statements PostgreSQL also has (INTEGER ids
// map to BIGSERIAL/BIGINT, BLOB to BYTEA); times are Unix milliseconds.
var migrations = []string{
	// 1: registry and counters.
	`CREATE TABLE meta (
		key   TEXT PRIMARY KEY,
		value INTEGER NOT NULL
	);
	INSERT INTO meta (key, value) VALUES ('registry_version', 0), ('msg_day', 0), ('msg_number', 0);
	CREATE TABLE devices (
		address             INTEGER PRIMARY KEY,
		password_hash       TEXT    NOT NULL DEFAULT '',
		ip                  TEXT    NOT NULL,
		port                INTEGER NOT NULL,
		version             TEXT    NOT NULL,
		mode                TEXT    NOT NULL,
		ctl_operations      INTEGER,
		ctl_max_length      INTEGER,
		ctl_lowest_priority INTEGER,
		next_instance       INTEGER NOT NULL DEFAULT 0,
		created             INTEGER NOT NULL,
		updated             INTEGER NOT NULL
	);
	CREATE INDEX devices_ip ON devices (ip, port);
	CREATE TABLE aliases (
		alias  TEXT PRIMARY KEY,
		device INTEGER NOT NULL REFERENCES devices (address) ON DELETE CASCADE
	);
	CREATE INDEX aliases_device ON aliases (device);`,

	// 2: submissions, queues and statuses.
	`CREATE TABLE submissions (
		id           INTEGER PRIMARY KEY,
		device       INTEGER NOT NULL,
		instance_id  INTEGER NOT NULL,
		content_hash BLOB    NOT NULL,
		content_type INTEGER NOT NULL,
		content      BLOB    NOT NULL,
		received     INTEGER NOT NULL,
		local_time   INTEGER NOT NULL,
		local_number INTEGER NOT NULL,
		state        TEXT    NOT NULL,
		verify       TEXT    NOT NULL DEFAULT '',
		updated      INTEGER NOT NULL
	);
	CREATE INDEX submissions_dedupe ON submissions (device, instance_id, content_hash, received);
	CREATE INDEX submissions_state ON submissions (state, received);
	CREATE TABLE deliveries (
		id                INTEGER PRIMARY KEY,
		device            INTEGER NOT NULL,
		message_id        TEXT    NOT NULL,
		submission_time   INTEGER,
		content_type      INTEGER NOT NULL,
		content           BLOB    NOT NULL,
		priority          INTEGER NOT NULL,
		state             TEXT    NOT NULL,
		attempts          INTEGER NOT NULL DEFAULT 0,
		next_attempt      INTEGER NOT NULL,
		expires           INTEGER NOT NULL,
		created           INTEGER NOT NULL,
		updated           INTEGER NOT NULL,
		last_error        TEXT    NOT NULL DEFAULT '',
		report_device     INTEGER NOT NULL DEFAULT 0,
		report_mail       TEXT    NOT NULL DEFAULT '',
		report_flags      INTEGER NOT NULL DEFAULT 0,
		report_recipient  TEXT    NOT NULL DEFAULT '',
		report_message_id TEXT    NOT NULL DEFAULT '',
		report_headers    BLOB
	);
	CREATE INDEX deliveries_due ON deliveries (state, device, next_attempt);
	CREATE INDEX deliveries_expires ON deliveries (state, expires);
	CREATE TABLE delivery_status (
		device     INTEGER NOT NULL,
		message_id TEXT    NOT NULL,
		status     INTEGER NOT NULL,
		updated    INTEGER NOT NULL,
		PRIMARY KEY (device, message_id)
	);
	CREATE TABLE relay_messages (
		id            INTEGER PRIMARY KEY,
		envelope_from TEXT    NOT NULL,
		data          BLOB    NOT NULL,
		created       INTEGER NOT NULL
	);
	CREATE TABLE relays (
		id                INTEGER PRIMARY KEY,
		message           INTEGER NOT NULL REFERENCES relay_messages (id),
		rcpt              TEXT    NOT NULL,
		state             TEXT    NOT NULL,
		attempts          INTEGER NOT NULL DEFAULT 0,
		next_attempt      INTEGER NOT NULL,
		expires           INTEGER NOT NULL,
		created           INTEGER NOT NULL,
		updated           INTEGER NOT NULL,
		last_error        TEXT    NOT NULL DEFAULT '',
		report_device     INTEGER NOT NULL DEFAULT 0,
		report_mail       TEXT    NOT NULL DEFAULT '',
		report_flags      INTEGER NOT NULL DEFAULT 0,
		report_recipient  TEXT    NOT NULL DEFAULT '',
		report_message_id TEXT    NOT NULL DEFAULT '',
		report_headers    BLOB
	);
	CREATE INDEX relays_due ON relays (state, next_attempt);
	CREATE INDEX relays_expires ON relays (state, expires);
	CREATE INDEX relays_message ON relays (message);`,

	// 3: where each device was last heard from (store.Contact). Kept
	// apart from the registry fields: changing it changes no registry
	// version. A device registered without IP address has ip ''.
	`ALTER TABLE devices ADD COLUMN contact_addr TEXT NOT NULL DEFAULT '';
	ALTER TABLE devices ADD COLUMN contact_via TEXT NOT NULL DEFAULT '';
	ALTER TABLE devices ADD COLUMN contact_at INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE devices ADD COLUMN contact_polled INTEGER NOT NULL DEFAULT 0;`,

	// 4: the Internet sender's DSN parameters (store.Report.DSN).
	`ALTER TABLE deliveries ADD COLUMN report_dsn TEXT NOT NULL DEFAULT '';
	ALTER TABLE relays ADD COLUMN report_dsn TEXT NOT NULL DEFAULT '';`,

	// 5: DTLS pre-shared keys, kept with the password hashes.
	`ALTER TABLE devices ADD COLUMN psk BLOB;
	ALTER TABLE devices ADD COLUMN require_dtls INTEGER NOT NULL DEFAULT 0;`,

	// 6: the scheduler's look-ups: the earliest next attempt (NextDue),
	// the devices with queued deliveries changed since a time
	// (QueuedDevices); both O(rows wanted), not O(queue).
	`CREATE INDEX deliveries_next ON deliveries (state, next_attempt);
	CREATE INDEX deliveries_changed ON deliveries (state, updated);`,

	// 7: the registry's change log (RegistryChanges): the devices each
	// version changed, the last store.RegistryLogVersions versions;
	// registry_log_from is the last version whose changes are not held.
	`CREATE TABLE registry_changes (
		version INTEGER NOT NULL,
		address INTEGER NOT NULL,
		PRIMARY KEY (version, address)
	) WITHOUT ROWID;
	INSERT INTO meta (key, value) SELECT 'registry_log_from', value FROM meta WHERE key = 'registry_version';`,

	// 8: a delivery's row is written twice (its claim and its outcome),
	// its content never: the content moves to a table of its own, so
	// that the rows are narrow and many share a page, and the size stays
	// with the row (limits, listings). A content row goes with its
	// delivery (purge, queue remove), never with an outcome. The indices
	// hold the rows of the states their look-ups want, as PostgreSQL's
	// do: the queued ones in four, the ones in flight in one, the
	// finished ones (purge, counts) in one. Indices led by the state
	// moved an entry in each of four indices at every claim and every
	// outcome; now a claim takes the entries out of the queued ones and
	// an outcome moves one. The queries name the states as literals,
	// which is what lets SQLite use a partial index.
	`CREATE TABLE delivery_content (
		id      INTEGER PRIMARY KEY REFERENCES deliveries (id) ON DELETE CASCADE,
		content BLOB    NOT NULL
	);
	INSERT INTO delivery_content (id, content) SELECT id, content FROM deliveries;
	ALTER TABLE deliveries ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
	UPDATE deliveries SET size = length(content);
	ALTER TABLE deliveries DROP COLUMN content;
	DROP INDEX deliveries_due;
	DROP INDEX deliveries_expires;
	DROP INDEX deliveries_next;
	DROP INDEX deliveries_changed;
	CREATE INDEX deliveries_queue ON deliveries (device, next_attempt) WHERE state = 'queued';
	CREATE INDEX deliveries_due ON deliveries (next_attempt) WHERE state = 'queued';
	CREATE INDEX deliveries_expires ON deliveries (expires) WHERE state = 'queued';
	CREATE INDEX deliveries_changed ON deliveries (updated) WHERE state = 'queued';
	CREATE INDEX deliveries_inflight ON deliveries (device) WHERE state = 'inflight';
	CREATE INDEX deliveries_done ON deliveries (state, updated) WHERE state IN ('delivered', 'failed');`,
}
