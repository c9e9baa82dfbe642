//! Errors of the token store and gate.

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid database URL: {0}")]
    Config(String),
    #[error("database: {context}: {}", describe(source))]
    Db {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database pool: {0}")]
    Pool(String),
    #[error("{kind} {name:?} does not exist")]
    NoSuchSubject { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("token {0} does not exist")]
    NoSuchToken(uuid::Uuid),
    #[error(transparent)]
    Random(#[from] crate::secret::RandomError),
    /// The database lacks the tables this build needs (0: none at all).
    #[error(
        "the token database schema is at version {found} of {needed}{}: \
         warren-admin applies the migrations when it starts",
        schema_hint(.found)
    )]
    Schema { found: i32, needed: i32 },
    #[error("migration {version} ({name}): {}", describe(source))]
    Migration {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn schema_hint(found: &i32) -> &'static str {
    if *found == 0 {
        " (no warren_migrations table: the schema is missing)"
    } else {
        ""
    }
}

/// tokio-postgres says only "db error"; the server's message is in the source.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => err.to_string(),
    }
}

impl TokenError {
    pub(crate) fn db(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Self {
        move |source| Self::Db { context, source }
    }

    /// Whether the database could not be reached (as opposed to a refused input).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Db { .. } | Self::Pool(_) | Self::Config(_) | Self::Schema { .. }
        )
    }
}

impl From<deadpool_postgres::PoolError> for TokenError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        Self::Pool(err.to_string())
    }
}
