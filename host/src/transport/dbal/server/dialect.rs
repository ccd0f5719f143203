//! What differs between PostgreSQL and MySQL/MariaDB: placeholders, the database's
//! clock, shared locks, column types, indexes and the migration lock. Every
//! statement of the server transport is written once, with `?` placeholders and
//! `wasmq_` table names, and turned into this server's text by [`Dialect::sql`].

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Mysql,
}

impl Dialect {
    /// `text` for this server and table prefix: `{now}` becomes the database's clock
    /// in milliseconds since the Unix epoch (so consumers on hosts with skewed clocks
    /// agree on leases and delays), `{share}` a shared row lock, `wasmq_` the prefix,
    /// and PostgreSQL's placeholders are numbered.
    pub fn sql(self, prefix: &str, text: &str) -> String {
        let text = text
            .replace("{now}", self.now_ms())
            .replace("{share}", self.share_lock());
        let text = match prefix {
            "wasmq_" => text,
            _ => text.replace("wasmq_", prefix),
        };
        match self {
            Dialect::Mysql => text,
            Dialect::Postgres => number_placeholders(&text),
        }
    }

    fn now_ms(self) -> &'static str {
        match self {
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Dialect::Mysql => "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
        }
    }

    fn share_lock(self) -> &'static str {
        match self {
            Dialect::Postgres => "FOR SHARE",
            // MariaDB does not know MySQL 8's FOR SHARE; both know this.
            Dialect::Mysql => "LOCK IN SHARE MODE",
        }
    }

    /// DDL with the column types of this server: `{id}` a message id or name,
    /// `{consumer}` a consumer id, `{blob}` a body, `{text}` long text, `{seq}` an
    /// auto-incrementing primary key, `{random_id}` a random id for rows a foreign
    /// client inserts without one, `{table}` table options.
    pub fn ddl(self, prefix: &str, text: &str) -> String {
        let types: &[(&str, &str)] = match self {
            Dialect::Postgres => &[
                ("{id}", "TEXT"),
                ("{consumer}", "TEXT"),
                ("{blob}", "BYTEA"),
                ("{text}", "TEXT"),
                ("{seq}", "BIGSERIAL PRIMARY KEY"),
                ("{random_id}", "(gen_random_uuid()::text)"),
                ("{table}", ""),
            ],
            Dialect::Mysql => &[
                // Index keys must fit 3072 bytes: 255 + 255 + 64 characters of 4 bytes.
                ("{id}", "VARCHAR(255)"),
                ("{consumer}", "VARCHAR(64)"),
                ("{blob}", "LONGBLOB"),
                // Read back through `text` (mod.rs): the Any driver sees it as a BLOB.
                ("{text}", "LONGTEXT"),
                ("{seq}", "BIGINT AUTO_INCREMENT PRIMARY KEY"),
                ("{random_id}", "(UUID())"),
                // Binary collation: queue names and ids compare byte for byte.
                (
                    "{table}",
                    "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
                ),
            ],
        };
        let text = types.iter().fold(text.to_string(), |text, (token, ty)| {
            text.replace(token, ty)
        });
        self.sql(prefix, &text)
    }

    /// The claim indexes. PostgreSQL keeps small partial indexes (rows waiting, rows
    /// released, rows claimed); MySQL has no partial indexes, so `claimed_by` is a key
    /// column instead.
    pub fn indexes(self) -> &'static [&'static str] {
        match self {
            Dialect::Postgres => &[
                "CREATE INDEX wasmq_messages_claim ON wasmq_messages (queue, processor, priority DESC, seq)
                 WHERE claimed_by IS NULL",
                "CREATE INDEX wasmq_messages_released ON wasmq_messages (queue, processor, priority DESC, seq)
                 WHERE claimed_by = 'released'",
                "CREATE INDEX wasmq_messages_claimed ON wasmq_messages (claimed_by)
                 WHERE claimed_by IS NOT NULL",
                "CREATE INDEX wasmq_delayed_due ON wasmq_delayed (available_at)",
            ],
            Dialect::Mysql => &[
                "CREATE INDEX wasmq_messages_claim ON wasmq_messages (queue, processor, claimed_by, priority DESC, seq)",
                "CREATE INDEX wasmq_messages_claimed ON wasmq_messages (claimed_by)",
                "CREATE INDEX wasmq_delayed_due ON wasmq_delayed (available_at)",
            ],
        }
    }

    /// `wasmq_send`, the producer contract for applications: it stores one row per
    /// route of the topic in `wasmq_routes`, in the caller's transaction, and fails
    /// naming the topic when nothing subscribes to it. On PostgreSQL a function that
    /// returns the new ids and notifies consumers; on MySQL a procedure.
    pub fn producer_routines(self) -> &'static [&'static str] {
        match self {
            Dialect::Postgres => &[
                "CREATE FUNCTION wasmq_send(p_topic TEXT, p_body BYTEA, p_headers TEXT DEFAULT '[]',
                                            p_priority BIGINT DEFAULT 2, p_delay_ms BIGINT DEFAULT 0)
                 RETURNS SETOF TEXT LANGUAGE plpgsql AS $$
                 DECLARE
                     r RECORD;
                     new_id TEXT;
                     routed BOOLEAN := false;
                 BEGIN
                     FOR r IN SELECT queue, processor FROM wasmq_routes WHERE topic = p_topic ORDER BY processor LOOP
                         new_id := gen_random_uuid()::text;
                         IF p_delay_ms > 0 THEN
                             INSERT INTO wasmq_delayed (id, queue, processor, topic, body, headers, priority, published_at, available_at)
                             VALUES (new_id, r.queue, r.processor, p_topic, p_body, p_headers, p_priority, {now}, {now} + p_delay_ms);
                         ELSE
                             INSERT INTO wasmq_messages (id, queue, processor, topic, body, headers, priority, published_at, available_at)
                             VALUES (new_id, r.queue, r.processor, p_topic, p_body, p_headers, p_priority, {now}, {now});
                         END IF;
                         routed := true;
                         RETURN NEXT new_id;
                     END LOOP;
                     IF NOT routed THEN
                         RAISE EXCEPTION 'wasmq_send: no processor subscribes to topic %: list it in a processor''s topics and start a consumer, which records its routes in wasmq_routes', p_topic;
                     END IF;
                     PERFORM pg_notify('wasmq_messages', '');
                 END $$",
            ],
            Dialect::Mysql => &[
                "CREATE PROCEDURE wasmq_send(IN p_topic VARCHAR(255), IN p_body LONGBLOB, IN p_headers LONGTEXT,
                                             IN p_priority BIGINT, IN p_delay_ms BIGINT)
                 BEGIN
                     IF (SELECT COUNT(*) FROM wasmq_routes WHERE topic = p_topic) = 0 THEN
                         SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'wasmq_send: no processor subscribes to this topic: list it in a processor''s topics and start a consumer, which records its routes in wasmq_routes';
                     END IF;
                     IF p_delay_ms > 0 THEN
                         INSERT INTO wasmq_delayed (id, queue, processor, topic, body, headers, priority, published_at, available_at)
                         SELECT UUID(), queue, processor, p_topic, p_body, p_headers, p_priority, {now}, {now} + p_delay_ms
                         FROM wasmq_routes WHERE topic = p_topic;
                     ELSE
                         INSERT INTO wasmq_messages (id, queue, processor, topic, body, headers, priority, published_at, available_at)
                         SELECT UUID(), queue, processor, p_topic, p_body, p_headers, p_priority, {now}, {now}
                         FROM wasmq_routes WHERE topic = p_topic;
                     END IF;
                 END",
            ],
        }
    }

    /// Takes the lock that serialises migrations across processes, on the
    /// connection that will run them.
    pub fn migration_lock(self, prefix: &str) -> String {
        match self {
            Dialect::Postgres => format!("SELECT pg_advisory_lock(hashtext('{prefix}schema'))"),
            Dialect::Mysql => format!("SELECT GET_LOCK('{prefix}schema', 60)"),
        }
    }

    pub fn migration_unlock(self, prefix: &str) -> String {
        match self {
            Dialect::Postgres => {
                format!("SELECT pg_advisory_unlock(hashtext('{prefix}schema'))")
            }
            Dialect::Mysql => format!("SELECT RELEASE_LOCK('{prefix}schema')"),
        }
    }

    /// The server's name, for logs and `wasmq check`.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::Mysql => "MySQL/MariaDB",
        }
    }
}

/// `?` placeholders as PostgreSQL's `$1`, `$2`…; our statements hold no `?` in
/// string literals.
fn number_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut n = 0;
    for c in text.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a server version string is one wasmq supports: PostgreSQL 13 (for
/// `gen_random_uuid`), MariaDB 10.6 and MySQL 8 (for `SKIP LOCKED`). Returns what is
/// needed when it is not.
pub fn check_version(dialect: Dialect, version: &str) -> Result<(), String> {
    let numbers: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .filter_map(|s| s.parse().ok())
        .collect();
    let (major, minor) = (
        numbers.first().copied().unwrap_or(0),
        numbers.get(1).copied().unwrap_or(0),
    );
    let needed = match dialect {
        Dialect::Postgres if major < 13 => Some("PostgreSQL 13 or later"),
        Dialect::Mysql if version.to_ascii_lowercase().contains("mariadb") => {
            ((major, minor) < (10, 6)).then_some("MariaDB 10.6 or later")
        }
        Dialect::Mysql if major < 8 => Some("MySQL 8 or later (or MariaDB 10.6 or later)"),
        _ => None,
    };
    match needed {
        Some(needed) => Err(format!(
            "the server is {version:?}; wasmq needs {needed} (for SKIP LOCKED): upgrade the server"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_written_once_for_both_servers() {
        let text =
            "SELECT seq FROM wasmq_messages WHERE queue = ? AND available_at <= {now} {share}";
        let pg = Dialect::Postgres.sql("app_", text);
        assert!(pg.contains("FROM app_messages WHERE queue = $1"), "{pg}");
        assert!(
            pg.contains("clock_timestamp()") && pg.ends_with("FOR SHARE"),
            "{pg}"
        );
        let my = Dialect::Mysql.sql("wasmq_", text);
        assert!(my.contains("queue = ? AND"), "{my}");
        assert!(my.ends_with("LOCK IN SHARE MODE"), "{my}");
    }

    #[test]
    fn old_servers_are_named_with_what_is_needed() {
        assert!(check_version(Dialect::Postgres, "15.19 (Debian 15.19-0+deb12u1)").is_ok());
        assert!(
            check_version(Dialect::Postgres, "12.2")
                .unwrap_err()
                .contains("13")
        );
        assert!(check_version(Dialect::Mysql, "10.11.19-MariaDB-0+deb12u1").is_ok());
        let old = check_version(Dialect::Mysql, "10.5.2-MariaDB").unwrap_err();
        assert!(
            old.contains("10.5.2-MariaDB") && old.contains("10.6"),
            "{old}"
        );
        assert!(check_version(Dialect::Mysql, "8.0.36").is_ok());
        assert!(
            check_version(Dialect::Mysql, "5.7.44")
                .unwrap_err()
                .contains("MySQL 8")
        );
    }
}
