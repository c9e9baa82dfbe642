//! Schema adjustments for Kubernetes.

use serde_json::{Map, Value};

/// Removes `format: uint8|uint16|uint32|uint64` that schemars emits for
/// unsigned Rust integers, here and in every nested schema. Kubernetes knows
/// only `int32`/`int64` and warns ("unrecognized format") on anything else;
/// the `minimum: 0` that schemars emits alongside still rejects negatives.
pub(crate) fn strip_unsigned_formats(schema: &mut schemars::Schema) {
    if let Some(object) = schema.as_object_mut() {
        strip_in_object(object);
    }
}

fn strip_in_object(object: &mut Map<String, Value>) {
    if matches!(object.get("format"), Some(Value::String(f)) if f.starts_with("uint")) {
        object.remove("format");
    }
    object.values_mut().for_each(strip_in_value);
}

fn strip_in_value(value: &mut Value) {
    match value {
        Value::Object(object) => strip_in_object(object),
        Value::Array(items) => items.iter_mut().for_each(strip_in_value),
        _ => {}
    }
}
