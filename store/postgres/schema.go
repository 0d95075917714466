package postgres

// migrations are applied in order; migrations[i] brings the schema to
// version i+1. Never edit a released migration: append a new one.
//
// Conventions (see the package doc): times are Unix milliseconds in BIGINT
// (0 = the zero time), as in store/sqlite, so both backends compare and
// round the same way; strings the caller chooses are BYTEA, so that any
// octets (NUL, invalid UTF-8) round-trip and sort bytewise like SQLite's
// BINARY collation; states and modes, which the store validates, are TEXT.
// Unsigned 32-bit values are BIGINT.
var migrations = []string{
	// 1: registry and counters.
	`CREATE TABLE registry_version (
		one     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
		version BIGINT  NOT NULL
	);
	INSERT INTO registry_version (version) VALUES (0);
	CREATE TABLE message_counter (
		one    BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
		day    BIGINT  NOT NULL,
		number BIGINT  NOT NULL
	);
	INSERT INTO message_counter (day, number) VALUES (0, 0);
	CREATE TABLE devices (
		address             BIGINT   PRIMARY KEY CHECK (address BETWEEN 1 AND 4294967295),
		password_hash       BYTEA    NOT NULL,
		ip                  TEXT     NOT NULL,
		port                INTEGER  NOT NULL CHECK (port BETWEEN 0 AND 65535),
		version             BYTEA    NOT NULL,
		mode                TEXT     NOT NULL CHECK (mode IN ('complete', 'efficient')),
		ctl_operations      BIGINT,
		ctl_max_length      BIGINT,
		ctl_lowest_priority SMALLINT,
		next_instance       SMALLINT NOT NULL DEFAULT 0,
		created             BIGINT   NOT NULL,
		updated             BIGINT   NOT NULL
	);
	CREATE TABLE aliases (
		alias  BYTEA  PRIMARY KEY,
		device BIGINT NOT NULL REFERENCES devices (address) ON DELETE CASCADE
	);
	CREATE INDEX aliases_device ON aliases (device);`,

	// 2: submissions, queues, statuses and the owners of claimed work.
	// owner is the node id of the handle that claimed (in-flight
	// deliveries, sending relays) or received (pending submissions) a row;
	// 0 = none.
	`CREATE SEQUENCE node_ids AS INTEGER MINVALUE 1 CYCLE;
	CREATE TABLE submissions (
		id           BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		device       BIGINT   NOT NULL,
		instance_id  SMALLINT NOT NULL,
		content_hash BYTEA    NOT NULL,
		content_type BIGINT   NOT NULL,
		content      BYTEA    NOT NULL,
		received     BIGINT   NOT NULL,
		local_time   BIGINT   NOT NULL,
		local_number BIGINT   NOT NULL,
		state        TEXT     NOT NULL CHECK (state IN ('pending', 'released', 'dropped')),
		verify       BYTEA    NOT NULL DEFAULT '',
		owner        INTEGER  NOT NULL DEFAULT 0,
		updated      BIGINT   NOT NULL,
		UNIQUE (local_time, local_number)
	);
	CREATE INDEX submissions_dedupe ON submissions (device, instance_id, content_hash, received);
	CREATE INDEX submissions_pending ON submissions (received, id) WHERE state = 'pending';
	CREATE INDEX submissions_done ON submissions (updated) WHERE state <> 'pending';
	CREATE TABLE deliveries (
		id                BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		device            BIGINT   NOT NULL,
		message_id        BYTEA    NOT NULL,
		submission_time   BIGINT,
		content_type      BIGINT   NOT NULL,
		content           BYTEA    NOT NULL,
		priority          SMALLINT NOT NULL,
		state             TEXT     NOT NULL CHECK (state IN ('queued', 'inflight', 'delivered', 'failed')),
		owner             INTEGER  NOT NULL DEFAULT 0,
		attempts          INTEGER  NOT NULL DEFAULT 0,
		next_attempt      BIGINT   NOT NULL,
		expires           BIGINT   NOT NULL,
		created           BIGINT   NOT NULL,
		updated           BIGINT   NOT NULL,
		last_error        BYTEA    NOT NULL DEFAULT '',
		report_device     BIGINT   NOT NULL DEFAULT 0,
		report_mail       BYTEA    NOT NULL DEFAULT '',
		report_flags      SMALLINT NOT NULL DEFAULT 0,
		report_recipient  BYTEA    NOT NULL DEFAULT '',
		report_message_id BYTEA    NOT NULL DEFAULT '',
		report_headers    BYTEA
	);
	-- Claims take a device's queued rows in id order.
	CREATE INDEX deliveries_queue ON deliveries (device, id) WHERE state = 'queued';
	CREATE INDEX deliveries_due ON deliveries (next_attempt) WHERE state = 'queued';
	CREATE INDEX deliveries_expires ON deliveries (expires) WHERE state = 'queued';
	-- One delivery in flight per device (docs/protocol.md EMSD §9.9), whichever
	-- server claimed it.
	CREATE UNIQUE INDEX deliveries_one_in_flight ON deliveries (device) WHERE state = 'inflight';
	CREATE INDEX deliveries_done ON deliveries (updated) WHERE state IN ('delivered', 'failed');
	CREATE TABLE delivery_status (
		device     BIGINT   NOT NULL,
		message_id BYTEA    NOT NULL,
		status     SMALLINT NOT NULL,
		updated    BIGINT   NOT NULL,
		PRIMARY KEY (device, message_id)
	);
	CREATE INDEX delivery_status_updated ON delivery_status (updated);
	CREATE TABLE relay_messages (
		id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		envelope_from BYTEA  NOT NULL,
		data          BYTEA  NOT NULL,
		created       BIGINT NOT NULL
	);
	CREATE TABLE relays (
		id                BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		message           BIGINT   NOT NULL REFERENCES relay_messages (id),
		rcpt              BYTEA    NOT NULL,
		state             TEXT     NOT NULL CHECK (state IN ('queued', 'sending', 'sent', 'failed')),
		owner             INTEGER  NOT NULL DEFAULT 0,
		attempts          INTEGER  NOT NULL DEFAULT 0,
		next_attempt      BIGINT   NOT NULL,
		expires           BIGINT   NOT NULL,
		created           BIGINT   NOT NULL,
		updated           BIGINT   NOT NULL,
		last_error        BYTEA    NOT NULL DEFAULT '',
		report_device     BIGINT   NOT NULL DEFAULT 0,
		report_mail       BYTEA    NOT NULL DEFAULT '',
		report_flags      SMALLINT NOT NULL DEFAULT 0,
		report_recipient  BYTEA    NOT NULL DEFAULT '',
		report_message_id BYTEA    NOT NULL DEFAULT '',
		report_headers    BYTEA
	);
	CREATE INDEX relays_queue ON relays (message, id) WHERE state = 'queued';
	CREATE INDEX relays_due ON relays (next_attempt) WHERE state = 'queued';
	CREATE INDEX relays_expires ON relays (expires) WHERE state = 'queued';
	CREATE INDEX relays_sending ON relays (owner) WHERE state = 'sending';
	CREATE INDEX relays_message ON relays (message);
	CREATE INDEX relays_done ON relays (updated) WHERE state IN ('sent', 'failed');`,

	// 3: where each device was last heard from (store.Contact), apart
	// from the registry fields: changing it changes no registry version.
	// contact_via names the server endpoint that heard it. A device
	// registered without IP address has ip ''.
	`ALTER TABLE devices ADD COLUMN contact_addr TEXT   NOT NULL DEFAULT '';
	ALTER TABLE devices ADD COLUMN contact_via  BYTEA  NOT NULL DEFAULT '';
	ALTER TABLE devices ADD COLUMN contact_at   BIGINT NOT NULL DEFAULT 0;
	ALTER TABLE devices ADD COLUMN contact_polled BOOLEAN NOT NULL DEFAULT FALSE;`,

	// 4: the Internet sender's DSN parameters (store.Report.DSN).
	`ALTER TABLE deliveries ADD COLUMN report_dsn BYTEA NOT NULL DEFAULT '';
	ALTER TABLE relays ADD COLUMN report_dsn BYTEA NOT NULL DEFAULT '';`,

	// 5: DTLS pre-shared keys, kept with the password hashes.
	`ALTER TABLE devices ADD COLUMN psk BYTEA, ADD COLUMN require_dtls BOOLEAN NOT NULL DEFAULT false;`,

	// 6: the scheduler's look-ups: a device's earliest next attempt
	// (DeviceNextDue), the devices with queued deliveries changed since a
	// time (QueuedDevices); both O(rows wanted), not O(queue).
	`CREATE INDEX deliveries_device_next ON deliveries (device, next_attempt) WHERE state = 'queued';
	CREATE INDEX deliveries_changed ON deliveries (updated) WHERE state = 'queued';`,

	// 7: the registry's change log (RegistryChanges): the devices each
	// version changed, the last store.RegistryLogVersions versions;
	// log_from is the last version whose changes are not held.
	`CREATE TABLE registry_changes (
		version BIGINT NOT NULL,
		address BIGINT NOT NULL,
		PRIMARY KEY (version, address)
	);
	ALTER TABLE registry_version ADD COLUMN log_from BIGINT NOT NULL DEFAULT 0;
	UPDATE registry_version SET log_from = version;`,
}
