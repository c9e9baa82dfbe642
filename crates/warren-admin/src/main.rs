//! `warren-admin`: `serve` runs the admin API and panel; the other
//! subcommands do the same operations directly on the token database, e.g.
//! `kubectl exec deploy/warren-admin -- warren-admin tokens create --user ana --max-uses 100`.

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::json;
use uuid::Uuid;
use warren_admin::{DbArgs, ServeArgs};
use warren_telemetry::LogArgs;
use warren_tokens::store::DenialFilter;
use warren_tokens::{Limit, NewToken, Reason, Store, SubjectKind, SubjectRef, SystemClock};

#[derive(Debug, Parser)]
#[command(
    name = "warren-admin",
    version,
    about = "Admin API, web panel and CLI for warren's Bearer tokens"
)]
struct Cli {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the admin API, the web panel, /healthz, /readyz and /metrics (applies migrations).
    Serve(ServeArgs),
    /// Apply the token database's migrations and exit.
    Migrate,
    /// Applications that own tokens.
    Applications {
        #[command(subcommand)]
        action: NamedAction,
    },
    /// User groups.
    Groups {
        #[command(subcommand)]
        action: NamedAction,
    },
    /// Users (optionally in a group).
    Users {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Bearer tokens.
    Tokens {
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Debug, Subcommand)]
enum NamedAction {
    /// Create one.
    Create { name: String },
    /// List them (JSON).
    List,
}

#[derive(Debug, Subcommand)]
enum UserAction {
    /// Create a user.
    Create {
        name: String,
        /// The user's group.
        #[arg(long)]
        group: Option<String>,
    },
    /// List users (JSON).
    List,
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct SubjectArg {
    /// The token belongs to this application.
    #[arg(long)]
    application: Option<String>,
    /// The token belongs to this user group.
    #[arg(long)]
    group: Option<String>,
    /// The token belongs to this user.
    #[arg(long)]
    user: Option<String>,
}

#[derive(Debug, clap::Args)]
#[group(multiple = false)]
struct LimitArg {
    /// At most this many uses, ever.
    #[arg(long)]
    max_uses: Option<u64>,
    /// At most this many uses per UTC calendar month.
    #[arg(long)]
    monthly: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Create a token; its secret is printed once (unlimited unless --max-uses or --monthly).
    Create {
        #[command(flatten)]
        subject: SubjectArg,
        #[command(flatten)]
        limit: LimitArg,
        /// A queue it may send to (repeat; default: every queue).
        #[arg(long = "queue")]
        queues: Vec<String>,
        /// When it expires (RFC 3339, e.g. 2027-01-01T00:00:00Z).
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// Print only the secret (for scripts).
        #[arg(long)]
        secret_only: bool,
    },
    /// List tokens with their usage (JSON).
    List,
    /// One token with its usage (JSON).
    Show { id: Uuid },
    /// Revoke a token (every sender refuses it within a second).
    Revoke { id: Uuid },
    /// A token's stored refusals (JSON).
    Denials {
        id: Uuid,
        /// Only this reason (e.g. usage_exceeded).
        #[arg(long)]
        reason: Option<String>,
    },
}

fn print(value: impl serde::Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&value).context("encoding JSON")?
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    warren_telemetry::install_crypto_provider();
    if let Command::Serve(args) = &cli.command {
        // Only the server logs: the CLI's standard output is its answer
        // (`TOKEN=$(warren-admin tokens create … --secret-only)`), errors go to stderr.
        warren_telemetry::init_tracing(&cli.log).context("setting up logging")?;
        let shutdown = warren_telemetry::shutdown_on_signal();
        let admin = warren_admin::serve(&cli.db, args, shutdown).await?;
        tracing::info!(addr = %admin.addr, "warren-admin listening");
        admin
            .server
            .await
            .context("HTTP server task")?
            .context("HTTP server")?;
        return Ok(());
    }
    let pool = warren_tokens::pool(&cli.db.database_url, 2).context("WARREN_DATABASE_URL")?;
    let store = Store::new(pool, Arc::new(SystemClock));
    store
        .migrate()
        .await
        .context("migrating the token database")?;
    match cli.command {
        Command::Serve(_) | Command::Migrate => {}
        Command::Applications { action } => match action {
            NamedAction::Create { name } => {
                let id = store.create_application(&name).await?;
                print(json!({"id": id, "kind": "application", "name": name}))?;
            }
            NamedAction::List => print(store.subjects(SubjectKind::Application).await?)?,
        },
        Command::Groups { action } => match action {
            NamedAction::Create { name } => {
                let id = store.create_group(&name).await?;
                print(json!({"id": id, "kind": "group", "name": name}))?;
            }
            NamedAction::List => print(store.subjects(SubjectKind::Group).await?)?,
        },
        Command::Users { action } => match action {
            UserAction::Create { name, group } => {
                let id = store.create_user(&name, group.as_deref()).await?;
                print(json!({"id": id, "kind": "user", "name": name, "group": group}))?;
            }
            UserAction::List => print(store.subjects(SubjectKind::User).await?)?,
        },
        Command::Tokens { action } => tokens(&store, action).await?,
    }
    Ok(())
}

/// `warren-admin tokens …`.
async fn tokens(store: &Store, action: TokenAction) -> anyhow::Result<()> {
    match action {
        TokenAction::Create {
            subject,
            limit,
            queues,
            expires_at,
            secret_only,
        } => {
            let new = NewToken {
                subject: subject_of(subject)?,
                limit: match (limit.max_uses, limit.monthly) {
                    (Some(n), _) => Limit::MaxUses(n),
                    (_, Some(n)) => Limit::Monthly(n),
                    _ => Limit::Unlimited,
                },
                queues: (!queues.is_empty()).then_some(queues),
                expires_at,
            };
            let (view, secret) = store.create_token(&new).await?;
            if secret_only {
                println!("{}", secret.as_str());
            } else {
                let mut out = json!(view);
                out["token"] = json!(secret.as_str());
                print(out)?;
                eprintln!("The token is shown only this once; only its hash is stored.");
            }
        }
        TokenAction::List => print(store.tokens().await?)?,
        TokenAction::Show { id } => print(store.token(id).await?)?,
        TokenAction::Revoke { id } => {
            store.revoke(id).await?;
            eprintln!("token {id} revoked");
        }
        TokenAction::Denials { id, reason } => {
            let reason = match reason {
                Some(code) => {
                    Some(Reason::parse(&code).with_context(|| format!("unknown reason {code:?}"))?)
                }
                None => None,
            };
            let filter = DenialFilter {
                token_id: Some(id),
                reason,
                limit: 1000,
            };
            print(store.denials(&filter).await?)?;
        }
    }
    Ok(())
}

/// The one subject named by `--application`, `--group` or `--user`.
fn subject_of(subject: SubjectArg) -> anyhow::Result<SubjectRef> {
    let (kind, name) = match (subject.application, subject.group, subject.user) {
        (Some(name), _, _) => (SubjectKind::Application, name),
        (_, Some(name), _) => (SubjectKind::Group, name),
        (_, _, Some(name)) => (SubjectKind::User, name),
        _ => anyhow::bail!("name the token's --application, --group or --user"),
    };
    Ok(SubjectRef { kind, name })
}
