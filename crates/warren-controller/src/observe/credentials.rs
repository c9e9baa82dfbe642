//! RabbitMQ credentials from the Secret a QueueScaler names.
//!
//! Secrets are read with a GET and cached for `ttl`, so a password rotation
//! is picked up within `ttl` and a thousand scalers sharing one Secret cost
//! one GET per `ttl`, not one per reconcile.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::observe::management::Credentials;

/// Which Secret and which of its keys hold the user name and password.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SecretKeys {
    pub namespace: String,
    pub name: String,
    pub username_key: String,
    pub password_key: String,
}

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("Secret {namespace}/{name} not found")]
    SecretNotFound { namespace: String, name: String },
    #[error("Secret {namespace}/{name} has no key {key:?}")]
    MissingKey {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("key {key:?} of Secret {namespace}/{name} is not UTF-8")]
    NotUtf8 {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("cannot read Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl CredentialsError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            CredentialsError::SecretNotFound { .. } => "secret_not_found",
            CredentialsError::MissingKey { .. } => "secret_key_missing",
            CredentialsError::NotUtf8 { .. } => "secret_not_utf8",
            CredentialsError::Api { .. } => "secret_api",
        }
    }

    /// A user mistake in the spec or the Secret (fixing it needs a human),
    /// as opposed to a transient API failure.
    pub fn is_configuration(&self) -> bool {
        !matches!(self, CredentialsError::Api { .. })
    }
}

/// Reads and caches credentials Secrets.
pub struct CredentialsCache {
    client: Client,
    ttl: Duration,
    entries: tokio::sync::Mutex<HashMap<SecretKeys, (Instant, Credentials)>>,
}

impl CredentialsCache {
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            entries: Default::default(),
        }
    }

    /// The credentials in `keys`, from the cache when younger than the TTL.
    pub async fn get(&self, keys: &SecretKeys) -> Result<Credentials, CredentialsError> {
        if let Some((at, credentials)) = self.entries.lock().await.get(keys)
            && at.elapsed() < self.ttl
        {
            return Ok(credentials.clone());
        }
        let credentials = self.fetch(keys).await?;
        self.entries
            .lock()
            .await
            .insert(keys.clone(), (Instant::now(), credentials.clone()));
        Ok(credentials)
    }

    async fn fetch(&self, keys: &SecretKeys) -> Result<Credentials, CredentialsError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &keys.namespace);
        let secret = api
            .get_opt(&keys.name)
            .await
            .map_err(|source| CredentialsError::Api {
                namespace: keys.namespace.clone(),
                name: keys.name.clone(),
                source,
            })?
            .ok_or_else(|| CredentialsError::SecretNotFound {
                namespace: keys.namespace.clone(),
                name: keys.name.clone(),
            })?;
        Ok(Credentials {
            username: secret_value(&secret, keys, &keys.username_key)?,
            password: secret_value(&secret, keys, &keys.password_key)?,
        })
    }
}

fn secret_value(secret: &Secret, keys: &SecretKeys, key: &str) -> Result<String, CredentialsError> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|data| data.get(key))
                .map(|s| s.as_bytes().to_vec())
        })
        .ok_or_else(|| CredentialsError::MissingKey {
            namespace: keys.namespace.clone(),
            name: keys.name.clone(),
            key: key.to_string(),
        })?;
    String::from_utf8(bytes).map_err(|_| CredentialsError::NotUtf8 {
        namespace: keys.namespace.clone(),
        name: keys.name.clone(),
        key: key.to_string(),
    })
}
