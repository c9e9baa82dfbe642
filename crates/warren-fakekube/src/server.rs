//! The HTTP face of the fake: routing, verbs, watch streams, kubeconfig.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::FakeKubeError;
use crate::resources::{self, CORE_EVENTS, EVENTS, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{ApiError, LogEntry, Origin, PatchType, Store, Subresource, WatchEventType};

/// Knobs for [`FakeApiServer::start_with`].
#[derive(Debug, Clone)]
pub struct FakeApiOptions {
    /// How often an idle watch that asked for bookmarks gets a BOOKMARK
    /// (Kubernetes sends them about once a minute; the fake is quicker so
    /// tests see them).
    pub bookmark_interval: Duration,
    /// How many watch events the log keeps; a watch from an older
    /// resourceVersion gets `410 Gone` ("Expired") and the client relists.
    pub event_log_capacity: usize,
    /// How many requests [`FakeApiServer::requests`] keeps (oldest dropped).
    pub request_log_capacity: usize,
    /// The bearer token the kubeconfig carries and the server requires.
    pub token: String,
}

impl Default for FakeApiOptions {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(5),
            event_log_capacity: 10_000,
            request_log_capacity: 100_000,
            token: "warren-fakekube-token".to_string(),
        }
    }
}

/// One HTTP request the fake served, for tests to assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method (`GET`, `PATCH`, ...).
    pub method: String,
    /// URL path without the query.
    pub path: String,
    /// Raw query string (empty if none).
    pub query: String,
    /// `Content-Type` header, if sent.
    pub content_type: Option<String>,
    /// Request body (lossy UTF-8).
    pub body: String,
    /// HTTP status code of the response.
    pub status: u16,
}

impl RecordedRequest {
    /// Whether the query string carries `name=value` (value compared after
    /// percent-decoding).
    pub fn has_query(&self, name: &str, value: &str) -> bool {
        url::form_urlencoded::parse(self.query.as_bytes()).any(|(k, v)| k == name && v == value)
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json_body(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }
}

pub(crate) struct Shared {
    store: Mutex<Store>,
    changed: watch::Sender<u64>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    options: FakeApiOptions,
    cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        f(&lock(&self.store))
    }

    /// Runs a store mutation and wakes watchers if the resourceVersion moved.
    pub(crate) fn write<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let (result, rv) = {
            let mut store = lock(&self.store);
            let result = f(&mut store);
            (result, store.resource_version())
        };
        self.changed.send_if_modified(|seen| {
            let moved = *seen != rv;
            *seen = rv;
            moved
        });
        result
    }
}

struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        self.task.abort();
    }
}

/// The fake API server. Cheap to clone; the server stops when the last clone
/// is dropped.
#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

/// Name used for the kubeconfig's cluster, user and context.
pub const KUBECONFIG_NAME: &str = "warren-fakekube";

/// Field manager recorded for writes made through the Rust test hooks.
const INTERNAL_MANAGER: &str = "warren-fakekube";

impl FakeApiServer {
    /// Starts a server on `127.0.0.1:<free port>` with default options.
    pub async fn start() -> Result<Self, FakeKubeError> {
        Self::start_with(FakeApiOptions::default()).await
    }

    /// Starts a server with the given options.
    pub async fn start_with(options: FakeApiOptions) -> Result<Self, FakeKubeError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(FakeKubeError::Bind)?;
        let addr = listener.local_addr().map_err(FakeKubeError::Bind)?;
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.event_log_capacity)),
            changed,
            requests: Mutex::new(VecDeque::new()),
            options,
            cancel: CancellationToken::new(),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let cancel = shared.cancel.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { cancel.cancelled().await });
            if let Err(err) = serve.await {
                tracing::warn!(error = %err, "fake API server stopped");
            }
        });
        tracing::debug!(%addr, "fake Kubernetes API server listening");
        Ok(Self {
            inner: Arc::new(Inner { shared, addr, task }),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The bearer token clients must send.
    pub fn token(&self) -> &str {
        &self.inner.shared.options.token
    }

    /// A kubeconfig (YAML) whose current context points at this server, with
    /// `namespace` as the context's default namespace.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: {KUBECONFIG_NAME}\n  \
               cluster:\n    \
                 server: {server}\n\
             users:\n\
             - name: {KUBECONFIG_NAME}\n  \
               user:\n    \
                 token: {token}\n\
             contexts:\n\
             - name: {KUBECONFIG_NAME}\n  \
               context:\n    \
                 cluster: {KUBECONFIG_NAME}\n    \
                 user: {KUBECONFIG_NAME}\n    \
                 namespace: {namespace}\n\
             current-context: {KUBECONFIG_NAME}\n",
            server = self.base_url(),
            token = self.token(),
        )
    }

    /// Writes [`kubeconfig_yaml`](Self::kubeconfig_yaml) (default namespace
    /// `default`) to `path`, for `KUBECONFIG=<path>`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), FakeKubeError> {
        self.write_kubeconfig_for(path, "default")
    }

    /// Like [`write_kubeconfig`](Self::write_kubeconfig) with a chosen default
    /// namespace.
    pub fn write_kubeconfig_for(
        &self,
        path: impl AsRef<Path>,
        namespace: &str,
    ) -> Result<(), FakeKubeError> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_yaml(namespace)).map_err(|source| {
            FakeKubeError::WriteKubeconfig {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// A `kube::Client` built from this server's kubeconfig, exactly as a
    /// process reading the kubeconfig file would build it. Installs rustls'
    /// ring provider if none is installed.
    pub async fn client(&self) -> Result<kube::Client, FakeKubeError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml("default"))?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates the object, or replaces it if it exists (no resourceVersion
    /// check; `status` is taken from `object`, as a test setting up state
    /// wants). The namespace comes from `object.metadata.namespace`
    /// (default `default`).
    pub fn put_object(&self, rt: &'static ResourceType, object: Value) -> Result<Value, ApiError> {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.shared().write(|store| {
            let exists = name
                .as_deref()
                .is_some_and(|n| store.get(rt, &namespace, n, Subresource::Main).is_ok());
            match name {
                Some(name) if exists => {
                    let mut object = object;
                    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                        meta.remove("resourceVersion");
                    }
                    store.replace(
                        rt,
                        &namespace,
                        &name,
                        Subresource::Main,
                        object,
                        Origin::Internal,
                        INTERNAL_MANAGER,
                        false,
                    )
                }
                _ => store.create(
                    rt,
                    &namespace,
                    object,
                    Origin::Internal,
                    INTERNAL_MANAGER,
                    false,
                ),
            }
        })
    }

    /// The stored object, if any.
    pub fn get_object(
        &self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        self.shared()
            .read(|store| store.get(rt, namespace, name, Subresource::Main).ok())
    }

    /// Stored objects of a type, in one namespace or all.
    pub fn list_objects(&self, rt: &'static ResourceType, namespace: Option<&str>) -> Vec<Value> {
        self.shared().read(|store| {
            store.list(
                rt,
                namespace,
                &LabelSelector::default(),
                &FieldSelector::default(),
            )
        })
    }

    /// Applies a JSON merge patch to the whole object (spec, metadata and
    /// status alike).
    pub fn patch_object(
        &self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
        merge_patch: &Value,
    ) -> Result<Value, ApiError> {
        self.shared().write(|store| {
            store.patch(
                rt,
                namespace,
                name,
                Subresource::Main,
                &PatchType::Merge,
                merge_patch,
                Origin::Internal,
                INTERNAL_MANAGER,
                false,
            )
        })
    }

    /// Deletes the object; returns it if it existed.
    pub fn delete_object(
        &self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        self.shared()
            .write(|store| store.delete(rt, namespace, name, false).ok())
    }

    /// Every Event recorded (events.k8s.io/v1 and core/v1), oldest first.
    pub fn events(&self) -> Vec<Value> {
        let mut events = self
            .shared()
            .read(|store| [store.all(&EVENTS), store.all(&CORE_EVENTS)].concat());
        events.sort_by_key(|e| {
            e.pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .and_then(|rv| rv.parse::<u64>().ok())
                .unwrap_or(0)
        });
        events
    }

    /// Every request served so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared().requests).iter().cloned().collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared().requests).clear();
    }

    /// A receiver that changes whenever anything in the store changes (the
    /// value is the latest resourceVersion).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared().changed.subscribe()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared().read(Store::resource_version)
    }

    /// Waits until the object exists and satisfies `pred`; returns it, or
    /// `None` on timeout.
    pub async fn wait_for_object(
        &self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let mut changes = self.changes();
        let deadline = Instant::now() + timeout;
        loop {
            changes.borrow_and_update();
            if let Some(object) = self.get_object(rt, namespace, name)
                && pred(&object)
            {
                return Some(object);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP handling

enum Route {
    Version,
    Collection {
        rt: &'static ResourceType,
        namespace: Option<String>,
    },
    Item {
        rt: &'static ResourceType,
        namespace: String,
        name: String,
        sub: Subresource,
    },
}

fn not_found_path() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn route(path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found_path()),
    };
    let find = |plural: &str| resources::lookup(group, version, plural).ok_or_else(not_found_path);
    match rest {
        [plural] => Ok(Route::Collection {
            rt: find(plural)?,
            namespace: None,
        }),
        ["namespaces", ns, plural] => Ok(Route::Collection {
            rt: find(plural)?,
            namespace: Some((*ns).to_string()),
        }),
        ["namespaces", ns, plural, name] => Ok(Route::Item {
            rt: find(plural)?,
            namespace: (*ns).to_string(),
            name: (*name).to_string(),
            sub: Subresource::Main,
        }),
        ["namespaces", ns, plural, name, sub] => {
            let rt = find(plural)?;
            let sub = match *sub {
                "status" if rt.status_subresource => Subresource::Status,
                "scale" if rt.scale_subresource => Subresource::Scale,
                _ => return Err(not_found_path()),
            };
            Ok(Route::Item {
                rt,
                namespace: (*ns).to_string(),
                name: (*name).to_string(),
                sub,
            })
        }
        _ => Err(not_found_path()),
    }
}

#[derive(Default)]
struct Query {
    watch: bool,
    resource_version: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    limit: Option<usize>,
    continue_token: Option<String>,
    timeout_seconds: Option<u64>,
    allow_bookmarks: bool,
    send_initial_events: bool,
    dry_run: bool,
    field_manager: Option<String>,
    force: bool,
}

fn parse_query(raw: Option<&str>) -> Query {
    let mut q = Query::default();
    for (key, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        let truthy = value == "true" || value == "1";
        match key.as_ref() {
            "watch" => q.watch = truthy,
            "resourceVersion" => q.resource_version = Some(value.into_owned()),
            "labelSelector" => q.label_selector = Some(value.into_owned()),
            "fieldSelector" => q.field_selector = Some(value.into_owned()),
            "limit" => q.limit = value.parse().ok().filter(|l| *l > 0),
            "continue" => q.continue_token = Some(value.into_owned()).filter(|c| !c.is_empty()),
            "timeoutSeconds" => q.timeout_seconds = value.parse().ok(),
            "allowWatchBookmarks" => q.allow_bookmarks = truthy,
            "sendInitialEvents" => q.send_initial_events = truthy,
            "dryRun" => q.dry_run = value == "All",
            "fieldManager" => q.field_manager = Some(value.into_owned()),
            "force" => q.force = truthy,
            // resourceVersionMatch, timeout, pretty, ...: the fake always
            // serves its latest state, which satisfies NotOlderThan and "0".
            _ => {}
        }
    }
    q
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(err: &ApiError) -> Response {
    json_response(err.code, &err.to_status())
}

/// `Accept: application/json;as=PartialObjectMetadata...` (kube's
/// `metadata_watcher`, `get_metadata`, `list_metadata`).
fn wants_metadata(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadata"))
}

fn metadata_only(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let response = serve(
        &shared,
        &method,
        &uri,
        &headers,
        content_type.as_deref(),
        &body,
    );
    tracing::debug!(%method, %uri, status = response.status().as_u16(), "fake API request");
    let mut requests = lock(&shared.requests);
    while requests.len() >= shared.options.request_log_capacity.max(1) {
        requests.pop_front();
    }
    requests.push_back(RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
        status: response.status().as_u16(),
    });
    drop(requests);
    response
}

fn parse_body(body: &[u8], yaml_ok: bool) -> Result<Value, ApiError> {
    match serde_json::from_slice(body) {
        Ok(value) => Ok(value),
        Err(json_err) if yaml_ok => {
            let text = std::str::from_utf8(body)
                .map_err(|e| ApiError::bad_request(format!("body is not UTF-8: {e}")))?;
            serde_saphyr::from_str::<Value>(text).map_err(|e| {
                ApiError::bad_request(format!("body is neither JSON ({json_err}) nor YAML ({e})"))
            })
        }
        Err(err) => Err(ApiError::bad_request(format!(
            "body is not valid JSON: {err}"
        ))),
    }
}

fn serve(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    content_type: Option<&str>,
    body: &[u8],
) -> Response {
    let route = match route(uri.path()) {
        Ok(route) => route,
        Err(err) => return error_response(&err),
    };
    if let Route::Version = route {
        // /version is readable without credentials, as in Kubernetes.
        return json_response(
            200,
            &json!({
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.0-warren-fakekube",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.24",
                "compiler": "gc",
                "platform": "linux/amd64",
            }),
        );
    }
    let expected = format!("Bearer {}", shared.options.token);
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if !authorized {
        return error_response(&ApiError::new(401, "Unauthorized", "Unauthorized"));
    }
    let query = parse_query(uri.query());
    let meta_only = wants_metadata(headers);
    let manager = query
        .field_manager
        .clone()
        .unwrap_or_else(|| "unknown".to_string());
    let result = match (route, method.clone()) {
        (Route::Version, _) => unreachable!("handled above"),
        (Route::Collection { rt, namespace }, Method::GET) => {
            if query.watch {
                return watch_response(shared, rt, namespace, &query, meta_only);
            }
            // The list is already shaped for `meta_only`.
            return match list(shared, rt, namespace.as_deref(), &query, meta_only) {
                Ok((code, list)) => json_response(code, &list),
                Err(err) => error_response(&err),
            };
        }
        (
            Route::Collection {
                rt,
                namespace: Some(ns),
            },
            Method::POST,
        ) => parse_body(body, false)
            .and_then(|object| {
                shared.write(|store| {
                    store.create(rt, &ns, object, Origin::Api, &manager, query.dry_run)
                })
            })
            .map(|created| (201, created)),
        (
            Route::Item {
                rt,
                namespace,
                name,
                sub,
            },
            Method::GET,
        ) => shared
            .read(|store| store.get(rt, &namespace, &name, sub))
            .map(|o| (200, o)),
        (
            Route::Item {
                rt,
                namespace,
                name,
                sub,
            },
            Method::PUT,
        ) => parse_body(body, false)
            .and_then(|object| {
                shared.write(|store| {
                    store.replace(
                        rt,
                        &namespace,
                        &name,
                        sub,
                        object,
                        Origin::Api,
                        &manager,
                        query.dry_run,
                    )
                })
            })
            .map(|o| (200, o)),
        (
            Route::Item {
                rt,
                namespace,
                name,
                sub,
            },
            Method::PATCH,
        ) => {
            let patch_type = match content_type.map(|c| c.split(';').next().unwrap_or("").trim()) {
                Some("application/merge-patch+json") => Ok(PatchType::Merge),
                Some("application/strategic-merge-patch+json") => Ok(PatchType::Strategic),
                Some("application/json-patch+json") => Ok(PatchType::Json),
                Some("application/apply-patch+yaml") => match &query.field_manager {
                    Some(m) if !m.is_empty() => Ok(PatchType::Apply {
                        manager: m.clone(),
                        force: query.force,
                    }),
                    _ => Err(ApiError::bad_request(
                        "PATCH, application/apply-patch+yaml: fieldManager is required for apply requests",
                    )),
                },
                other => Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"
                    ),
                )),
            };
            let yaml_ok = matches!(patch_type, Ok(PatchType::Apply { .. }));
            patch_type
                .and_then(|pt| parse_body(body, yaml_ok).map(|b| (pt, b)))
                .and_then(|(pt, patch)| {
                    shared.write(|store| {
                        store.patch(
                            rt,
                            &namespace,
                            &name,
                            sub,
                            &pt,
                            &patch,
                            Origin::Api,
                            &manager,
                            query.dry_run,
                        )
                    })
                })
                .map(|o| (200, o))
        }
        (
            Route::Item {
                rt,
                namespace,
                name,
                sub: Subresource::Main,
            },
            Method::DELETE,
        ) => shared
            .write(|store| store.delete(rt, &namespace, &name, query.dry_run))
            .map(|o| (200, o)),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )),
    };
    match result {
        Ok((code, object)) if meta_only => json_response(code, &metadata_only(&object)),
        Ok((code, object)) => json_response(code, &object),
        Err(err) => error_response(&err),
    }
}

fn selectors(query: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.label_selector.as_deref().unwrap_or_default())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fields = FieldSelector::parse(query.field_selector.as_deref().unwrap_or_default())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((labels, fields))
}

fn object_position(object: &Value) -> (String, String) {
    let get = |f: &str| {
        object
            .pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (get("namespace"), get("name"))
}

/// LIST, with `limit`/`continue` paging. Simplification: a continuation page
/// is cut from the current state (Kubernetes serves a consistent snapshot),
/// but every page reports the first page's resourceVersion so a watch started
/// from it replays whatever changed in between.
fn list(
    shared: &Arc<Shared>,
    rt: &'static ResourceType,
    namespace: Option<&str>,
    query: &Query,
    meta_only: bool,
) -> Result<(u16, Value), ApiError> {
    let (labels, fields) = selectors(query)?;
    let (items, rv) = shared.read(|store| {
        (
            store.list(rt, namespace, &labels, &fields),
            store.resource_version(),
        )
    });
    let (list_rv, after) = match &query.continue_token {
        Some(token) => {
            let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
            let (rv, position) = token.split_once(':').ok_or_else(bad)?;
            let (ns, name) = position.split_once('/').ok_or_else(bad)?;
            let rv: u64 = rv.parse().map_err(|_| bad())?;
            (rv, Some((ns.to_string(), name.to_string())))
        }
        None => (rv, None),
    };
    let mut items: Vec<Value> = items
        .into_iter()
        .filter(|o| after.as_ref().is_none_or(|a| object_position(o) > *a))
        .collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(limit) = query.limit
        && items.len() > limit
    {
        items.truncate(limit);
        if let Some(last) = items.last() {
            let (ns, name) = object_position(last);
            metadata["continue"] = json!(format!("{list_rv}:{ns}/{name}"));
        }
    }
    let (api_version, kind, items) = if meta_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
            items.iter().map(metadata_only).collect(),
        )
    } else {
        (rt.api_version(), format!("{}List", rt.kind), items)
    };
    Ok((
        200,
        json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items}),
    ))
}

// ---------------------------------------------------------------------------
// WATCH

struct WatchStream {
    shared: Arc<Shared>,
    rt: &'static ResourceType,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    meta_only: bool,
    cursor: u64,
    pending: VecDeque<Bytes>,
    changes: watch::Receiver<u64>,
    deadline: Instant,
    bookmarks: bool,
    next_bookmark: Instant,
    done: bool,
}

fn line(event_type: &str, object: &Value) -> Bytes {
    let mut text = json!({"type": event_type, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

impl WatchStream {
    fn matches(&self, object: &Value) -> bool {
        let in_ns = self.namespace.as_deref().is_none_or(|ns| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(ns)
        });
        in_ns && self.labels.matches(object) && self.fields.matches(object)
    }

    fn render(&self, object: &Value) -> Value {
        if self.meta_only {
            metadata_only(object)
        } else {
            object.clone()
        }
    }

    fn bookmark(&self, initial_events_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": self.cursor.to_string()});
        if initial_events_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object =
            json!({"kind": self.rt.kind, "apiVersion": self.rt.api_version(), "metadata": meta});
        line("BOOKMARK", &object)
    }

    /// Translates a logged change for this watch's filter: an object that
    /// starts matching is ADDED, one that stops matching is DELETED.
    fn translate(&self, entry: &LogEntry) -> Option<Bytes> {
        let now = self.matches(&entry.object);
        let before = entry.old.as_deref().is_some_and(|o| self.matches(o));
        let event_type = match entry.kind {
            WatchEventType::Added | WatchEventType::Deleted if now => entry.kind,
            WatchEventType::Modified => match (before, now) {
                (true, true) => WatchEventType::Modified,
                (false, true) => WatchEventType::Added,
                (true, false) => WatchEventType::Deleted,
                (false, false) => return None,
            },
            _ => return None,
        };
        Some(line(event_type.as_str(), &self.render(&entry.object)))
    }

    fn expired(&mut self, requested: u64, oldest: u64) {
        let status = ApiError::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
        .to_status();
        self.pending.push_back(line("ERROR", &status));
        self.done = true;
    }

    /// Moves new log entries into `pending`.
    fn poll_log(&mut self) {
        self.changes.borrow_and_update();
        let res = Store::res_id(self.rt);
        let cursor = self.cursor;
        let result = self.shared.read(|store| {
            store
                .events_since(res, cursor)
                .map(|e| (e, store.resource_version()))
        });
        match result {
            Ok((entries, rv)) => {
                for entry in &entries {
                    if let Some(bytes) = self.translate(entry) {
                        self.pending.push_back(bytes);
                    }
                }
                self.cursor = rv;
            }
            Err(expired) => self.expired(expired.requested, expired.oldest),
        }
    }

    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Some((Ok(bytes), self));
            }
            if self.done {
                return None;
            }
            self.poll_log();
            if !self.pending.is_empty() || self.done {
                continue;
            }
            let cancel = self.shared.cancel.clone();
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        self.done = true;
                    }
                }
                () = tokio::time::sleep_until(self.deadline) => self.done = true,
                () = tokio::time::sleep_until(self.next_bookmark) => {
                    self.next_bookmark = Instant::now() + self.shared.options.bookmark_interval;
                    if self.bookmarks {
                        let bookmark = self.bookmark(false);
                        self.pending.push_back(bookmark);
                    }
                }
                () = cancel.cancelled() => self.done = true,
            }
        }
    }
}

/// WATCH: `resourceVersion` unset, "" or "0" starts with synthetic ADDED
/// events for the current state ("get state and start at most recent");
/// otherwise the log is replayed from after that version. With
/// `sendInitialEvents=true` the initial events end with a BOOKMARK annotated
/// `k8s.io/initial-events-end` (streaming lists).
fn watch_response(
    shared: &Arc<Shared>,
    rt: &'static ResourceType,
    namespace: Option<String>,
    query: &Query,
    meta_only: bool,
) -> Response {
    let (labels, fields) = match selectors(query) {
        Ok(s) => s,
        Err(err) => return error_response(&err),
    };
    let start = match query.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resource version {rv:?}"
                )));
            }
        },
    };
    let timeout = Duration::from_secs(query.timeout_seconds.unwrap_or(1800).max(1));
    let now = Instant::now();
    let mut stream = WatchStream {
        shared: shared.clone(),
        rt,
        namespace,
        labels,
        fields,
        meta_only,
        cursor: start.unwrap_or(0),
        pending: VecDeque::new(),
        changes: shared.changed.subscribe(),
        deadline: now + timeout,
        bookmarks: query.allow_bookmarks,
        next_bookmark: now + shared.options.bookmark_interval,
        done: false,
    };
    if start.is_none() {
        stream.changes.borrow_and_update();
        let (objects, rv) = shared.read(|store| {
            (
                store.list(
                    rt,
                    stream.namespace.as_deref(),
                    &stream.labels,
                    &stream.fields,
                ),
                store.resource_version(),
            )
        });
        for object in &objects {
            let bytes = line("ADDED", &stream.render(object));
            stream.pending.push_back(bytes);
        }
        stream.cursor = rv;
        if query.send_initial_events {
            let bookmark = stream.bookmark(true);
            stream.pending.push_back(bookmark);
        }
    }
    let body = Body::from_stream(futures::stream::unfold(stream, WatchStream::next));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
