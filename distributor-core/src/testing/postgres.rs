//! Throw-away PostgreSQL databases for tests (features `testing` and `postgres`).
//!
//! The server is `DISTRIBUTOR_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`,
//! the database used only to create and drop others). Each [`TestDatabase`] is a database of its
//! own with a unique name, dropped by [`TestDatabase::drop`].

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The URL of the server's maintenance database.
pub fn server_url() -> String {
    std::env::var("DISTRIBUTOR_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Why PostgreSQL tests cannot run here (the server does not answer), or `None`.
pub async fn unreachable() -> Option<String> {
    let url = server_url();
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        PgConnection::connect(&url),
    )
    .await
    {
        Ok(Ok(c)) => {
            let _ = c.close().await;
            None
        }
        Ok(Err(e)) => Some(format!(
            "no PostgreSQL at {url} ({e}); set DISTRIBUTOR_TEST_POSTGRES"
        )),
        Err(_) => Some(format!(
            "no PostgreSQL at {url} (timed out); set DISTRIBUTOR_TEST_POSTGRES"
        )),
    }
}

/// A database created for one test.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates a database with a unique name on the server.
    pub async fn create() -> Result<Self, String> {
        let server = server_url();
        let name = format!("distributor_test_{}", uuid::Uuid::new_v4().simple());
        let mut c = PgConnection::connect(&server)
            .await
            .map_err(|e| format!("connect {server}: {e}"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .map_err(|e| format!("create database: {e}"))?;
        let _ = c.close().await;
        let url = match server.rfind('/') {
            Some(i) if server[..i].contains("://") && i > server.find("://").unwrap_or(0) + 2 => {
                let (base, rest) = server.split_at(i);
                let query = rest.find('?').map_or("", |q| &rest[q..]);
                format!("{base}/{name}{query}")
            }
            _ => format!("{server}/{name}"),
        };
        Ok(Self { name, url })
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops it (closing whatever connections are still open to it).
    pub async fn drop(self) {
        if let Ok(mut c) = PgConnection::connect(&server_url()).await {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut c)
                .await
            {
                tracing::warn!(database = %self.name, error = %e, "could not drop test database");
            }
            let _ = c.close().await;
        }
    }
}
