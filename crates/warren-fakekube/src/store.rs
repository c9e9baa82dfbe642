//! The object store: objects as JSON, one global resourceVersion counter, an
//! event log that watches replay from, and the field ownership that server-side
//! apply conflicts are computed from.
//!
//! Simplifications (each is documented where it happens):
//! - deletion is immediate: finalizers and graceful deletion are not modelled
//!   (the process-backed ReplicaSet models pod termination itself);
//! - strategic merge patch is treated as a JSON merge patch (lists replace
//!   instead of merging by key) — fine for the maps and scalars the controller
//!   and kube-lease-manager patch;
//! - server-side apply is a merge patch plus per-field ownership: an applier
//!   that changes a field another manager owns gets a 409 Conflict unless it
//!   forces. Lists are atomic, each field has one owner (the last writer), and
//!   fields an applier stops specifying are not removed;
//! - the only defaulting is `spec.replicas = 1` on scalable workloads.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use crate::patch::{self, JsonPatchError, leaves, merge_patch};
use crate::resources::ResourceType;
use crate::selector::{FieldSelector, LabelSelector, render_label_selector};

/// Identifies a resource type inside the store: (group, plural).
pub(crate) type ResId = (&'static str, &'static str);

fn res_id(rt: &'static ResourceType) -> ResId {
    (rt.group, rt.plural)
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    res: ResId,
    namespace: String,
    name: String,
}

impl Key {
    fn new(rt: &'static ResourceType, namespace: &str, name: &str) -> Self {
        Self {
            res: res_id(rt),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// Type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object deleted.
    Deleted,
}

impl WatchEventType {
    /// The wire name (`ADDED`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as a watch replays it.
#[derive(Debug, Clone)]
pub(crate) struct LogEntry {
    pub rv: u64,
    pub res: ResId,
    pub kind: WatchEventType,
    /// The object before a modification (to translate selector transitions).
    pub old: Option<Arc<Value>>,
    pub object: Arc<Value>,
}

/// Which part of an object a request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    /// The object itself.
    Main,
    /// `/status`.
    Status,
    /// `/scale`.
    Scale,
}

/// Who is writing: the HTTP API (subresource rules apply) or a test hook /
/// the fake ReplicaSet (writes the whole object, like a kubelet or controller
/// with full access would through the right subresource).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Api,
    Internal,
}

/// The patch formats the API accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json` — applied as a merge patch.
    Strategic,
    /// `application/json-patch+json`.
    Json,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply {
        /// `fieldManager` query parameter (required by Kubernetes for apply).
        manager: String,
        /// `force=true`.
        force: bool,
    },
}

/// A Kubernetes API error, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Machine-readable reason (`NotFound`, `Conflict`, ...).
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, rt: &ResourceType, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": rt.group, "kind": rt.plural}));
        self
    }

    pub(crate) fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", rt.qualified_name()),
        )
        .with_details(rt, name)
    }

    pub(crate) fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", rt.qualified_name()),
        )
        .with_details(rt, name)
    }

    pub(crate) fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                rt.qualified_name()
            ),
        )
        .with_details(rt, name)
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn invalid(rt: &ResourceType, name: &str, message: impl Into<String>) -> Self {
        Self::new(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: {}",
                rt.qualified_name(),
                message.into()
            ),
        )
        .with_details(rt, name)
    }

    /// The `Status` object Kubernetes sends for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

const CONFLICT_MODIFIED: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// The watch asked for history the log no longer holds.
#[derive(Debug)]
pub(crate) struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

pub(crate) struct Store {
    objects: BTreeMap<Key, Value>,
    /// Field path -> manager, per object (see the module notes on apply).
    owners: HashMap<Key, BTreeMap<String, String>>,
    rv: u64,
    log: VecDeque<LogEntry>,
    /// The log holds every event with a resourceVersion above this.
    oldest_rv: u64,
    log_capacity: usize,
}

pub(crate) fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.is_object() {
        *object = json!({});
    }
    let Value::Object(map) = object else {
        unreachable!("just made it an object")
    };
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    match meta {
        Value::Object(meta) => meta,
        _ => unreachable!("just made it an object"),
    }
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn set_field(object: &mut Value, field: &str, value: Option<Value>) {
    if let Value::Object(map) = object {
        match value {
            Some(v) => {
                map.insert(field.to_string(), v);
            }
            None => {
                map.remove(field);
            }
        }
    }
}

/// Everything but `metadata` and `status`: what `generation` tracks.
fn generation_relevant(object: &Value) -> Value {
    let mut copy = object.clone();
    set_field(&mut copy, "metadata", None);
    set_field(&mut copy, "status", None);
    copy
}

/// Field paths that ownership does not track (identity and bookkeeping).
fn owned_path(path: &str) -> bool {
    if path == "apiVersion" || path == "kind" {
        return false;
    }
    match path.strip_prefix("metadata.") {
        Some(rest) => rest.starts_with("labels.") || rest.starts_with("annotations."),
        None => true,
    }
}

/// A fresh `generateName` suffix (5 lowercase alphanumerics, like Kubernetes).
fn name_suffix() -> String {
    uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(5)
        .collect()
}

impl Store {
    pub(crate) fn new(log_capacity: usize) -> Self {
        Self {
            objects: BTreeMap::new(),
            owners: HashMap::new(),
            rv: 0,
            log: VecDeque::new(),
            oldest_rv: 0,
            log_capacity: log_capacity.max(1),
        }
    }

    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    pub(crate) fn get(
        &self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        let object = self
            .objects
            .get(&Key::new(rt, namespace, name))
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        Ok(view(object, sub))
    }

    /// Objects of a type, in (namespace, name) order, filtered.
    pub(crate) fn list(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(key, _)| key.res == res_id(rt))
            .filter(|(key, _)| namespace.is_none_or(|ns| key.namespace == ns))
            .map(|(_, object)| object)
            .filter(|object| labels.matches(object) && fields.matches(object))
            .cloned()
            .collect()
    }

    /// Log entries of a type after `rv`.
    pub(crate) fn events_since(&self, res: ResId, rv: u64) -> Result<Vec<LogEntry>, Expired> {
        if rv < self.oldest_rv {
            return Err(Expired {
                requested: rv,
                oldest: self.oldest_rv,
            });
        }
        let start = self.log.partition_point(|e| e.rv <= rv);
        Ok(self
            .log
            .range(start..)
            .filter(|e| e.res == res)
            .cloned()
            .collect())
    }

    pub(crate) fn res_id(rt: &'static ResourceType) -> ResId {
        res_id(rt)
    }

    pub(crate) fn create(
        &mut self,
        rt: &'static ResourceType,
        namespace: &str,
        mut body: Value,
        origin: Origin,
        manager: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        let meta = meta_mut(&mut body);
        match meta.get("namespace").and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() && ns != namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", name_suffix()),
                _ => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        meta.insert("name".into(), json!(name));
        // Kubernetes rejects a create that carries a resourceVersion; the fake
        // just ignores it, like every other server-owned metadata field.
        for field in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
            "deletionTimestamp",
        ] {
            meta.remove(field);
        }
        let key = Key::new(rt, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        if origin == Origin::Api && rt.status_subresource {
            // With a status subresource, status in a create body is ignored.
            set_field(&mut body, "status", None);
        }
        Ok(self.commit(rt, key, None, body, manager, dry_run))
    }

    /// PUT: replace the object (or its status / scale).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn replace(
        &mut self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
        sub: Subresource,
        body: Value,
        origin: Origin,
        manager: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if let Some(body_name) = meta_str(&body, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        self.update(rt, namespace, name, sub, origin, manager, dry_run, |_| {
            Ok(body)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &mut self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
        sub: Subresource,
        patch_type: &PatchType,
        body: &Value,
        origin: Origin,
        field_manager: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let key = Key::new(rt, namespace, name);
        let PatchType::Apply { manager, force } = patch_type else {
            return self.update(
                rt,
                namespace,
                name,
                sub,
                origin,
                field_manager,
                dry_run,
                |current| {
                    let mut doc = current.clone();
                    match patch_type {
                        PatchType::Json => {
                            patch::json_patch(&mut doc, body).map_err(|e| match e {
                                JsonPatchError::TestFailed { .. } | JsonPatchError::Path { .. } => {
                                    ApiError::invalid(rt, name, e.to_string())
                                }
                                _ => ApiError::bad_request(e.to_string()),
                            })?
                        }
                        // Simplification: strategic merge patch is applied as a
                        // JSON merge patch (no merge keys; lists are replaced).
                        _ => merge_patch(&mut doc, body),
                    }
                    Ok(doc)
                },
            );
        };
        if !body.is_object() {
            return Err(ApiError::bad_request("an apply patch must be an object"));
        }
        if !self.objects.contains_key(&key) {
            // Server-side apply creates a missing object (not via subresources).
            if sub != Subresource::Main {
                return Err(ApiError::not_found(rt, name));
            }
            let mut object = body.clone();
            meta_mut(&mut object).insert("name".into(), json!(name));
            let created = self.create(rt, namespace, object, origin, manager, dry_run)?;
            if !dry_run {
                self.take_ownership(&key, body, manager);
            }
            return Ok(created);
        }
        let owners = self.owners.get(&key).cloned().unwrap_or_default();
        let result = self.update(
            rt,
            namespace,
            name,
            sub,
            origin,
            manager,
            dry_run,
            |current| {
                if !force {
                    let conflicts: Vec<String> = leaves(body)
                        .into_iter()
                        .filter(|(path, _)| owned_path(path))
                        .filter(|(path, value)| {
                            patch::at_path(current, path).is_some_and(|cur| cur != *value)
                        })
                        .filter_map(|(path, _)| match owners.get(&path) {
                            Some(owner) if owner != manager => {
                                Some(format!("conflict with \"{owner}\": .{path}"))
                            }
                            _ => None,
                        })
                        .collect();
                    if !conflicts.is_empty() {
                        return Err(ApiError::conflict(
                            rt,
                            name,
                            &format!(
                                "Apply failed with {} conflict(s): {}",
                                conflicts.len(),
                                conflicts.join(", ")
                            ),
                        ));
                    }
                }
                let mut doc = current.clone();
                merge_patch(&mut doc, body);
                Ok(doc)
            },
        )?;
        if !dry_run {
            self.take_ownership(&key, body, manager);
        }
        Ok(result)
    }

    fn take_ownership(&mut self, key: &Key, applied: &Value, manager: &str) {
        let owners = self.owners.entry(key.clone()).or_default();
        for (path, value) in leaves(applied) {
            if owned_path(&path) && !value.is_null() {
                owners.insert(path, manager.to_string());
            }
        }
    }

    /// Read-modify-write of the object (or a subresource view of it).
    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
        sub: Subresource,
        origin: Origin,
        manager: &str,
        dry_run: bool,
        compute: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let key = Key::new(rt, namespace, name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        let current = view(&old, sub);
        let mut proposed = compute(&current)?;
        if !proposed.is_object() {
            return Err(ApiError::bad_request("the object must be a JSON object"));
        }
        // Optimistic concurrency: a resourceVersion in the new object (a PUT
        // body, or one a patch sets) must match the stored one.
        let old_rv = meta_str(&old, "resourceVersion").unwrap_or_default();
        if let Some(rv) = meta_str(&proposed, "resourceVersion")
            && !rv.is_empty()
            && rv != old_rv
        {
            return Err(ApiError::conflict(rt, name, CONFLICT_MODIFIED));
        }
        let new = match sub {
            Subresource::Main => {
                if origin == Origin::Api && rt.status_subresource {
                    set_field(&mut proposed, "status", old.get("status").cloned());
                }
                proposed
            }
            Subresource::Status => {
                let mut new = old.clone();
                set_field(&mut new, "status", proposed.get("status").cloned());
                new
            }
            Subresource::Scale => {
                let replicas = match proposed.pointer("/spec/replicas") {
                    None | Some(Value::Null) => 0,
                    Some(v) => v.as_i64().filter(|r| *r >= 0).ok_or_else(|| {
                        ApiError::invalid(
                            rt,
                            name,
                            "spec.replicas: Invalid value: must be a non-negative integer",
                        )
                    })?,
                };
                let mut new = old.clone();
                if !new.get("spec").is_some_and(Value::is_object) {
                    set_field(&mut new, "spec", Some(json!({})));
                }
                new["spec"]["replicas"] = json!(replicas);
                new
            }
        };
        let committed = self.commit(rt, key, Some(old), new, manager, dry_run);
        Ok(view(&committed, sub))
    }

    pub(crate) fn delete(
        &mut self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let key = Key::new(rt, namespace, name);
        if dry_run {
            return self
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(rt, name));
        }
        // Simplification: deletion is immediate (no finalizers, no graceful
        // deletion; the fake ReplicaSet terminates pod processes itself).
        let mut object = self
            .objects
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        self.owners.remove(&key);
        self.rv += 1;
        meta_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.push_log(LogEntry {
            rv: self.rv,
            res: res_id(rt),
            kind: WatchEventType::Deleted,
            old: None,
            object: Arc::new(object.clone()),
        });
        Ok(object)
    }

    /// Stamps server-owned fields, bumps resourceVersion (unless nothing
    /// changed), records field ownership and the watch event.
    fn commit(
        &mut self,
        rt: &'static ResourceType,
        key: Key,
        old: Option<Value>,
        mut new: Value,
        manager: &str,
        dry_run: bool,
    ) -> Value {
        set_field(&mut new, "apiVersion", Some(json!(rt.api_version())));
        set_field(&mut new, "kind", Some(json!(rt.kind)));
        if rt.scale_subresource {
            // The one piece of API defaulting the fake does.
            if !new.get("spec").is_some_and(Value::is_object) {
                set_field(&mut new, "spec", Some(json!({})));
            }
            if new["spec"].get("replicas").is_none_or(Value::is_null) {
                new["spec"]["replicas"] = json!(1);
            }
        }
        {
            let meta = meta_mut(&mut new);
            meta.insert("name".into(), json!(key.name));
            meta.insert("namespace".into(), json!(key.namespace));
            meta.remove("managedFields");
            match &old {
                Some(old) => {
                    for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
                        match old.get("metadata").and_then(|m| m.get(field)) {
                            Some(v) => meta.insert(field.into(), v.clone()),
                            None => meta.remove(field),
                        };
                    }
                }
                None => {
                    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
                    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
                    if rt.status_subresource {
                        meta.insert("generation".into(), json!(1));
                    }
                }
            }
        }
        if let Some(old) = &old {
            if *old == new {
                // A no-op write: Kubernetes neither bumps resourceVersion nor
                // emits a watch event.
                return new;
            }
            if rt.status_subresource && generation_relevant(old) != generation_relevant(&new) {
                let generation = new
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
            }
        }
        if dry_run {
            return new;
        }
        self.rv += 1;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(self.rv.to_string()));

        // Ownership: whoever changed a field owns it; removed fields are
        // forgotten.
        let owners = self.owners.entry(key.clone()).or_default();
        let new_leaves = leaves(&new);
        let old_leaves = old.as_ref().map(leaves).unwrap_or_default();
        for (path, value) in &new_leaves {
            if owned_path(path) && old_leaves.get(path) != Some(value) {
                owners.insert(path.clone(), manager.to_string());
            }
        }
        owners.retain(|path, _| new_leaves.contains_key(path));

        let kind = if old.is_some() {
            WatchEventType::Modified
        } else {
            WatchEventType::Added
        };
        self.push_log(LogEntry {
            rv: self.rv,
            res: key.res,
            kind,
            old: old.map(Arc::new),
            object: Arc::new(new.clone()),
        });
        self.objects.insert(key, new.clone());
        new
    }

    fn push_log(&mut self, entry: LogEntry) {
        self.log.push_back(entry);
        while self.log.len() > self.log_capacity {
            if let Some(dropped) = self.log.pop_front() {
                self.oldest_rv = dropped.rv;
            }
        }
    }

    /// Every stored object of a type in every namespace, unfiltered.
    pub(crate) fn all(&self, rt: &'static ResourceType) -> Vec<Value> {
        self.list(
            rt,
            None,
            &LabelSelector::default(),
            &FieldSelector::default(),
        )
    }
}

/// The object as a subresource presents it (`/scale` is an autoscaling/v1
/// Scale; `/status` and the main resource are the object itself).
fn view(object: &Value, sub: Subresource) -> Value {
    if sub != Subresource::Scale {
        return object.clone();
    }
    let meta = object.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let mut scale_meta = Map::new();
    for field in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = meta.get(field) {
            scale_meta.insert(field.into(), v.clone());
        }
    }
    let selector = object
        .pointer("/spec/selector")
        .map(render_label_selector)
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": scale_meta,
        "spec": {"replicas": object.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0)},
        "status": {
            "replicas": object.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": selector,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{DEPLOYMENTS, LEASES, QUEUESCALERS};

    fn deployment(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}}}})
    }

    #[test]
    fn create_stamps_metadata_and_rejects_duplicates() {
        let mut store = Store::new(100);
        let created = store
            .create(&DEPLOYMENTS, "ns", deployment("w"), Origin::Api, "t", false)
            .unwrap();
        assert_eq!(created["metadata"]["resourceVersion"], "1");
        assert_eq!(created["metadata"]["generation"], 1);
        assert_eq!(created["apiVersion"], "apps/v1");
        assert!(created["metadata"]["uid"].is_string());
        let err = store
            .create(&DEPLOYMENTS, "ns", deployment("w"), Origin::Api, "t", false)
            .unwrap_err();
        assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));
    }

    #[test]
    fn status_patch_keeps_generation_spec_patch_bumps_it() {
        let mut store = Store::new(100);
        store
            .create(
                &QUEUESCALERS,
                "ns",
                json!({"metadata": {"name": "q"}, "spec": {"maxReplicas": 3}}),
                Origin::Api,
                "t",
                false,
            )
            .unwrap();
        let s = store
            .patch(
                &QUEUESCALERS,
                "ns",
                "q",
                Subresource::Status,
                &PatchType::Merge,
                &json!({"status": {"desiredReplicas": 2}, "spec": {"maxReplicas": 9}}),
                Origin::Api,
                "t",
                false,
            )
            .unwrap();
        assert_eq!(s["metadata"]["generation"], 1);
        assert_eq!(
            s["spec"]["maxReplicas"], 3,
            "status patch must not touch spec"
        );
        assert_eq!(s["status"]["desiredReplicas"], 2);
        let m = store
            .patch(
                &QUEUESCALERS,
                "ns",
                "q",
                Subresource::Main,
                &PatchType::Merge,
                &json!({"status": {"desiredReplicas": 7}, "spec": {"maxReplicas": 9}}),
                Origin::Api,
                "t",
                false,
            )
            .unwrap();
        assert_eq!(m["metadata"]["generation"], 2);
        assert_eq!(
            m["status"]["desiredReplicas"], 2,
            "main patch must not touch status"
        );
        // A no-op patch changes nothing, not even the resourceVersion.
        let rv = m["metadata"]["resourceVersion"].clone();
        let again = store
            .patch(
                &QUEUESCALERS,
                "ns",
                "q",
                Subresource::Main,
                &PatchType::Merge,
                &json!({"spec": {"maxReplicas": 9}}),
                Origin::Api,
                "t",
                false,
            )
            .unwrap();
        assert_eq!(again["metadata"]["resourceVersion"], rv);
    }

    #[test]
    fn scale_view_and_patch() {
        let mut store = Store::new(100);
        store
            .create(&DEPLOYMENTS, "ns", deployment("w"), Origin::Api, "t", false)
            .unwrap();
        let scale = store
            .get(&DEPLOYMENTS, "ns", "w", Subresource::Scale)
            .unwrap();
        assert_eq!(scale["spec"]["replicas"], 2);
        assert_eq!(scale["status"]["selector"], "app=w");
        let scale = store
            .patch(
                &DEPLOYMENTS,
                "ns",
                "w",
                Subresource::Scale,
                &PatchType::Merge,
                &json!({"spec": {"replicas": 5}}),
                Origin::Api,
                "t",
                false,
            )
            .unwrap();
        assert_eq!(scale["kind"], "Scale");
        let d = store
            .get(&DEPLOYMENTS, "ns", "w", Subresource::Main)
            .unwrap();
        assert_eq!(d["spec"]["replicas"], 5);
        assert_eq!(d["metadata"]["generation"], 2);
    }

    #[test]
    fn put_with_stale_resource_version_conflicts() {
        let mut store = Store::new(100);
        let lease = store
            .create(
                &LEASES,
                "ns",
                json!({"metadata": {"name": "l"}, "spec": {}}),
                Origin::Api,
                "t",
                false,
            )
            .unwrap();
        let mut next = lease.clone();
        next["spec"]["holderIdentity"] = json!("a");
        store
            .replace(
                &LEASES,
                "ns",
                "l",
                Subresource::Main,
                next.clone(),
                Origin::Api,
                "t",
                false,
            )
            .unwrap();
        let err = store
            .replace(
                &LEASES,
                "ns",
                "l",
                Subresource::Main,
                next,
                Origin::Api,
                "t",
                false,
            )
            .unwrap_err();
        assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    }

    #[test]
    fn apply_conflicts_on_fields_owned_by_another_manager() {
        let mut store = Store::new(100);
        let apply = |m: &str, force| PatchType::Apply {
            manager: m.into(),
            force,
        };
        let a = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}});
        let b = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"holderIdentity": "b", "leaseDurationSeconds": 15}});
        store
            .patch(
                &LEASES,
                "ns",
                "l",
                Subresource::Main,
                &apply("ma", false),
                &a,
                Origin::Api,
                "ma",
                false,
            )
            .unwrap();
        let err = store
            .patch(
                &LEASES,
                "ns",
                "l",
                Subresource::Main,
                &apply("mb", false),
                &b,
                Origin::Api,
                "mb",
                false,
            )
            .unwrap_err();
        assert_eq!(err.code, 409);
        assert!(
            err.message.contains("spec.holderIdentity"),
            "{}",
            err.message
        );
        // Same value, different manager: no conflict.
        store
            .patch(
                &LEASES,
                "ns",
                "l",
                Subresource::Main,
                &apply("mb", false),
                &a,
                Origin::Api,
                "mb",
                false,
            )
            .unwrap();
        // After the field is cleared by an update, anyone may apply it.
        store
            .patch(
                &LEASES,
                "ns",
                "l",
                Subresource::Main,
                &PatchType::Strategic,
                &json!({"spec": {"holderIdentity": null}}),
                Origin::Api,
                "mb",
                false,
            )
            .unwrap();
        let got = store
            .patch(
                &LEASES,
                "ns",
                "l",
                Subresource::Main,
                &apply("mb", false),
                &b,
                Origin::Api,
                "mb",
                false,
            )
            .unwrap();
        assert_eq!(got["spec"]["holderIdentity"], "b");
        // Force wins.
        store
            .patch(
                &LEASES,
                "ns",
                "l",
                Subresource::Main,
                &apply("ma", true),
                &a,
                Origin::Api,
                "ma",
                false,
            )
            .unwrap();
    }

    #[test]
    fn log_replays_and_expires() {
        let mut store = Store::new(2);
        for i in 0..4 {
            store
                .create(
                    &LEASES,
                    "ns",
                    json!({"metadata": {"name": format!("l{i}")}}),
                    Origin::Api,
                    "t",
                    false,
                )
                .unwrap();
        }
        let res = Store::res_id(&LEASES);
        assert_eq!(store.events_since(res, 2).unwrap().len(), 2);
        assert!(store.events_since(res, 1).is_err());
    }
}
