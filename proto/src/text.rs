//! Text (JSON or YAML) to `serde_json::Value`.

use serde_json::{Map, Number, Value};
use serde_yaml::Value as Yaml;

use crate::CodecError;

/// Parses JSON or YAML text into a JSON value, the way Envoy reads config files.
///
/// JSON is tried first (fast, exact errors); anything else goes through YAML, which is a
/// superset. YAML specifics are mapped to what proto JSON accepts: non-string map keys become
/// strings, merge keys (`<<`) are applied, tags are dropped, and non-finite floats become
/// the strings `"NaN"`, `"Infinity"` and `"-Infinity"`.
pub fn parse_text(text: &str) -> Result<Value, CodecError> {
    let json_err = match serde_json::from_str::<Value>(text) {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    let mut yaml: Yaml = serde_yaml::from_str(text).map_err(|yaml_err| {
        let trimmed = text.trim_start();
        let message = if trimmed.starts_with('{') || trimmed.starts_with('[') {
            format!("JSON: {json_err}; YAML: {yaml_err}")
        } else {
            yaml_err.to_string()
        };
        CodecError::Text { message }
    })?;
    yaml.apply_merge().map_err(|err| CodecError::Text {
        message: format!("YAML merge key: {err}"),
    })?;
    Ok(yaml_to_json(yaml))
}

fn yaml_to_json(yaml: Yaml) -> Value {
    match yaml {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(b),
        Yaml::Number(n) => yaml_number(&n),
        Yaml::String(s) => Value::String(s),
        Yaml::Sequence(items) => Value::Array(items.into_iter().map(yaml_to_json).collect()),
        Yaml::Mapping(mapping) => {
            let mut map = Map::new();
            for (key, value) in mapping {
                map.insert(yaml_key(key), yaml_to_json(value));
            }
            Value::Object(map)
        }
        Yaml::Tagged(tagged) => yaml_to_json(tagged.value),
    }
}

fn yaml_number(n: &serde_yaml::Number) -> Value {
    if let Some(u) = n.as_u64() {
        Value::Number(u.into())
    } else if let Some(i) = n.as_i64() {
        Value::Number(i.into())
    } else {
        let f = n.as_f64().unwrap_or(f64::NAN);
        match Number::from_f64(f) {
            Some(num) => Value::Number(num),
            None if f.is_nan() => Value::String("NaN".to_owned()),
            None if f > 0.0 => Value::String("Infinity".to_owned()),
            None => Value::String("-Infinity".to_owned()),
        }
    }
}

fn yaml_key(key: Yaml) -> String {
    match key {
        Yaml::String(s) => s,
        Yaml::Null => "null".to_owned(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Tagged(tagged) => yaml_key(tagged.value),
        other => yaml_to_json(other).to_string(),
    }
}
