//! The message stores a suite can run on: the SQLite file, and real PostgreSQL and
//! MariaDB/MySQL servers on loopback, each test with a database of its own (dropped
//! at the end). `WASMQ_TEST_BACKENDS=sqlite,postgres,mysql` picks them (default: all
//! three). The servers are read with their own command-line clients, as an operator
//! would.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mysql,
}

/// The backends this run covers.
pub fn backends() -> Vec<Backend> {
    let chosen = std::env::var("WASMQ_TEST_BACKENDS")
        .unwrap_or_else(|_| "sqlite,postgres,mysql".to_string());
    chosen
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| match name {
            "sqlite" => Backend::Sqlite,
            "postgres" => Backend::Postgres,
            "mysql" | "mariadb" => Backend::Mysql,
            other => panic!("WASMQ_TEST_BACKENDS names {other:?}: use sqlite, postgres or mysql"),
        })
        .collect()
}

/// A database of its own on a server, dropped when the test ends.
pub struct ServerDb {
    pub backend: Backend,
    pub name: String,
}

impl ServerDb {
    pub fn create(backend: Backend) -> ServerDb {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "wasmq_t_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin = match backend {
            Backend::Postgres => "postgres",
            _ => "",
        };
        let db = ServerDb { backend, name };
        db.admin(
            admin,
            &format!("DROP DATABASE IF EXISTS {0}; CREATE DATABASE {0};", db.name),
        );
        db
    }

    /// The `[transport] dsn` of this database.
    pub fn dsn(&self) -> String {
        match self.backend {
            Backend::Postgres => format!("postgres://postgres@127.0.0.1:5432/{}", self.name),
            Backend::Mysql => format!("mysql://root@127.0.0.1:3306/{}", self.name),
            Backend::Sqlite => unreachable!("SQLite has no server"),
        }
    }

    /// Runs `script` on `database` (the test's own when empty); returns its rows,
    /// tab-separated, one per line.
    pub fn run(&self, script: &str) -> Vec<Vec<String>> {
        self.admin(&self.name, script)
    }

    /// [`ServerDb::run`] for a script that may fail: its rows, or the client's error.
    pub fn try_run(&self, script: &str) -> Result<Vec<Vec<String>>, String> {
        self.client(&self.name, script)
    }

    fn admin(&self, database: &str, script: &str) -> Vec<Vec<String>> {
        self.client(database, script).unwrap_or_else(|error| {
            panic!(
                "the SQL client failed on {script:.300}: {error}\nIs the server up? {}",
                start_command(self.backend)
            )
        })
    }

    fn client(&self, database: &str, script: &str) -> Result<Vec<Vec<String>>, String> {
        let (program, args): (&str, Vec<&str>) = match self.backend {
            Backend::Postgres => (
                "psql",
                vec![
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    if database.is_empty() {
                        "postgres"
                    } else {
                        database
                    },
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-F",
                    "\t",
                    "-v",
                    "ON_ERROR_STOP=1",
                ],
            ),
            Backend::Mysql => {
                let mut args = vec!["-h", "127.0.0.1", "-u", "root", "-N", "-B"];
                if !database.is_empty() {
                    args.push(database);
                }
                ("mysql", args)
            }
            Backend::Sqlite => unreachable!("SQLite has no server"),
        };
        let mut child = Command::new(program)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {program}: {e}; install the server's client"));
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(script.as_bytes())
            .expect("writing SQL to the client");
        let out = child.wait_with_output().expect("the SQL client");
        if !out.status.success() {
            return Err(format!(
                "{program}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| line.split('\t').map(str::to_string).collect())
            .collect())
    }

    /// A body column as text.
    pub fn body_text(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "convert_from(body, 'UTF8')",
            _ => "body",
        }
    }

    /// `text` as a body literal.
    pub fn body_literal(&self, text: &str) -> String {
        let quoted = self.quote(text);
        match self.backend {
            Backend::Postgres => format!("convert_to({quoted}, 'UTF8')"),
            _ => quoted,
        }
    }

    /// An SQL string literal (MySQL also escapes backslashes).
    pub fn quote(&self, text: &str) -> String {
        let text = match self.backend {
            Backend::Mysql => text.replace('\\', "\\\\"),
            _ => text.to_string(),
        };
        format!("'{}'", text.replace('\'', "''"))
    }
}

impl Drop for ServerDb {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let admin = if self.backend == Backend::Postgres {
                "postgres"
            } else {
                ""
            };
            let drop = match self.backend {
                Backend::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE);", self.name),
                _ => format!("DROP DATABASE IF EXISTS {};", self.name),
            };
            self.admin(admin, &drop);
        }
    }
}

/// The command that starts a server that is down (as .ci/run does).
fn start_command(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => {
            "start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        }
        Backend::Mysql => {
            "start it: start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"
        }
        Backend::Sqlite => "",
    }
}
