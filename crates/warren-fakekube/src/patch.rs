//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and the
//! leaf-path bookkeeping the fake's server-side apply uses.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Applies an RFC 7386 JSON merge patch to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Why a JSON patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum JsonPatchError {
    /// The body is not an array of operations.
    #[error("a JSON patch must be an array of operations")]
    NotAnArray,
    /// An operation is malformed (missing `op`, `path`, `value`, `from`).
    #[error("malformed operation {index}: {reason}")]
    Malformed { index: usize, reason: String },
    /// A path does not exist (or cannot be created).
    #[error("operation {index}: path {path:?} does not exist")]
    Path { index: usize, path: String },
    /// A `test` operation failed.
    #[error("operation {index}: test failed at {path:?}")]
    TestFailed { index: usize, path: String },
}

/// Applies an RFC 6902 JSON patch (`add`, `remove`, `replace`, `move`,
/// `copy`, `test`). All-or-nothing: on error `target` is unchanged.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let Value::Array(ops) = patch else {
        return Err(JsonPatchError::NotAnArray);
    };
    let mut doc = target.clone();
    for (index, op) in ops.iter().enumerate() {
        let field = |name: &str| -> Result<&Value, JsonPatchError> {
            op.get(name).ok_or_else(|| JsonPatchError::Malformed {
                index,
                reason: format!("missing {name:?}"),
            })
        };
        let text = |name: &str| -> Result<String, JsonPatchError> {
            field(name)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| JsonPatchError::Malformed {
                    index,
                    reason: format!("{name:?} is not a string"),
                })
        };
        let path = text("path")?;
        let path_err = || JsonPatchError::Path {
            index,
            path: path.clone(),
        };
        match text("op")?.as_str() {
            "add" => add(&mut doc, &path, field("value")?.clone()).ok_or_else(path_err)?,
            "remove" => {
                remove(&mut doc, &path).ok_or_else(path_err)?;
            }
            "replace" => {
                let slot = doc.pointer_mut(&path).ok_or_else(path_err)?;
                *slot = field("value")?.clone();
            }
            "move" => {
                let from = text("from")?;
                let value = remove(&mut doc, &from).ok_or_else(|| JsonPatchError::Path {
                    index,
                    path: from.clone(),
                })?;
                add(&mut doc, &path, value).ok_or_else(path_err)?;
            }
            "copy" => {
                let from = text("from")?;
                let value = doc
                    .pointer(&from)
                    .cloned()
                    .ok_or_else(|| JsonPatchError::Path {
                        index,
                        path: from.clone(),
                    })?;
                add(&mut doc, &path, value).ok_or_else(path_err)?;
            }
            "test" => {
                if doc.pointer(&path) != Some(field("value")?) {
                    return Err(JsonPatchError::TestFailed { index, path });
                }
            }
            other => {
                return Err(JsonPatchError::Malformed {
                    index,
                    reason: format!("unknown op {other:?}"),
                });
            }
        }
    }
    *target = doc;
    Ok(())
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Splits a JSON pointer into (parent pointer, last token).
fn split_pointer(path: &str) -> Option<(&str, String)> {
    let cut = path.rfind('/')?;
    Some((&path[..cut], unescape(&path[cut + 1..])))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Option<()> {
    if path.is_empty() {
        *doc = value;
        return Some(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent)? {
        Value::Object(map) => {
            map.insert(last, value);
            Some(())
        }
        Value::Array(items) => {
            let at = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>().ok()?
            };
            if at > items.len() {
                return None;
            }
            items.insert(at, value);
            Some(())
        }
        _ => None,
    }
}

fn remove(doc: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent)? {
        Value::Object(map) => map.remove(&last),
        Value::Array(items) => {
            let at = last.parse::<usize>().ok()?;
            (at < items.len()).then(|| items.remove(at))
        }
        _ => None,
    }
}

/// Every leaf of `value` by dotted path (`spec.holderIdentity`). Objects are
/// descended into; arrays and scalars are leaves (lists are atomic, see the
/// server-side apply notes in `store`).
pub fn leaves(value: &Value) -> BTreeMap<String, &Value> {
    let mut out = BTreeMap::new();
    collect_leaves(value, String::new(), &mut out);
    out
}

fn collect_leaves<'a>(value: &'a Value, prefix: String, out: &mut BTreeMap<String, &'a Value>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                collect_leaves(child, path, out);
            }
        }
        _ if prefix.is_empty() => {}
        other => {
            out.insert(prefix, other);
        }
    }
}

/// The value at a dotted path, if any.
pub fn at_path<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |node, key| node.get(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut doc,
            &json!({"a": "z", "c": {"f": null, "h": 1}, "l": [3]}),
        );
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e", "h": 1}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops_and_atomicity() {
        let mut doc = json!({"metadata": {"annotations": {"x": "1"}}, "items": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/items/0", "value": 1},
                {"op": "add", "path": "/metadata/annotations/a~1b", "value": "2"},
                {"op": "replace", "path": "/metadata/annotations/x", "value": "3"},
                {"op": "add", "path": "/items/-", "value": 9},
                {"op": "remove", "path": "/items/0"},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"annotations": {"x": "3", "a/b": "2"}}, "items": [2, 9]})
        );
        let before = doc.clone();
        let err = json_patch(
            &mut doc,
            &json!([
                {"op": "remove", "path": "/items/0"},
                {"op": "test", "path": "/items/0", "value": 42},
            ]),
        );
        assert!(matches!(err, Err(JsonPatchError::TestFailed { .. })));
        assert_eq!(doc, before);
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "replace", "path": "/nope/x", "value": 1}])
            )
            .is_err()
        );
    }

    #[test]
    fn leaves_are_dotted_paths() {
        let doc = json!({"spec": {"a": 1, "b": {"c": [1]}}, "kind": "X"});
        let got: Vec<_> = leaves(&doc).into_keys().collect();
        assert_eq!(got, vec!["kind", "spec.a", "spec.b.c"]);
        assert_eq!(at_path(&doc, "spec.b.c"), Some(&json!([1])));
    }
}
