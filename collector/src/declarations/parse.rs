//! YAML → declarations. Every document is parsed; every problem is reported, with the file,
//! the document's index (1-based) and the field path.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_yaml_ng::Value;

use super::model::{ApprovedChange, Declaration, Detections, Kind, Team, Watch, Workload};

/// Where a declaration came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// File name as given to `apply`.
    pub file: String,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
}

/// A parsed declaration and its source.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub source: Source,
    pub declaration: Declaration,
}

/// One thing wrong with the input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{file}: document {document}{}: {field}: {message}", object_suffix(.object))]
pub struct Problem {
    /// File name (`(stored)` for a declaration already in the registry).
    pub file: String,
    /// 1-based document index (0 for stored declarations).
    pub document: usize,
    /// `Kind name` when known.
    pub object: String,
    /// Field path such as `match.exe` or `expect.windows[1].tz`; `(document)` for the whole.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

fn object_suffix(object: &str) -> String {
    if object.is_empty() { String::new() } else { format!(" ({object})") }
}

impl Problem {
    /// A problem at `source`.
    pub fn at(
        source: &Source,
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: source.file.clone(),
            document: source.document,
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

fn kinds_list() -> String {
    Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

/// Parses every document of one file. Problems are appended; nothing stops at the first one.
pub fn parse_file(file: &str, text: &str, out: &mut Vec<Parsed>, problems: &mut Vec<Problem>) {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let source = Source { file: file.to_owned(), document: index + 1 };
        let value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                problems.push(Problem::at(
                    &source,
                    "",
                    "(document)",
                    format!("not valid YAML: {e}"),
                ));
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        };
        match parse_document(&source, value) {
            Ok(Some(declaration)) => out.push(Parsed { source, declaration }),
            Ok(None) => {}
            Err(problem) => problems.push(*problem),
        }
    }
}

fn parse_document(source: &Source, value: Value) -> Result<Option<Declaration>, Box<Problem>> {
    let mut map = match value {
        Value::Null => return Ok(None),
        Value::Mapping(map) => map,
        other => {
            return Err(Box::new(Problem::at(
                source,
                "",
                "(document)",
                format!("expected a mapping with `kind` and `name`, found {}", value_type(&other)),
            )));
        }
    };
    let name = map.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
    let kind = match map.remove("kind") {
        None => {
            let msg = format!("missing; expected one of {}", kinds_list());
            return Err(Box::new(Problem::at(source, "", "kind", msg)));
        }
        Some(Value::String(kind)) => match Kind::ALL.into_iter().find(|k| k.as_str() == kind) {
            Some(kind) => kind,
            None => {
                let hint = Kind::parse_loose(&kind)
                    .map(|k| format!(" (did you mean {k}?)"))
                    .unwrap_or_default();
                let msg = format!("unknown kind {kind:?}{hint}; expected one of {}", kinds_list());
                return Err(Box::new(Problem::at(source, "", "kind", msg)));
            }
        },
        Some(other) => {
            let msg =
                format!("expected a string, one of {}; found {}", kinds_list(), value_type(&other));
            return Err(Box::new(Problem::at(source, "", "kind", msg)));
        }
    };
    let object = if name.is_empty() { kind.to_string() } else { format!("{kind} {name}") };
    let rest = Value::Mapping(map);
    let result = match kind {
        Kind::Watch => typed::<Watch>(rest).map(Declaration::Watch),
        Kind::Team => typed::<Team>(rest).map(Declaration::Team),
        Kind::Workload => typed::<Workload>(rest).map(Declaration::Workload),
        Kind::ApprovedChange => typed::<ApprovedChange>(rest).map(Declaration::ApprovedChange),
        Kind::Detections => typed::<Detections>(rest).map(Declaration::Detections),
    };
    result
        .map(Some)
        .map_err(|(field, message)| Box::new(Problem::at(source, object, field, message)))
}

/// Deserializes with the failing field's path; "missing field" errors name the field itself.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let path = if path == "." { String::new() } else { path };
        let field = match message.strip_prefix("missing field `").and_then(|m| m.split('`').next())
        {
            Some(missing) if path.is_empty() => missing.to_owned(),
            Some(missing) => format!("{path}.{missing}"),
            None if path.is_empty() => "(document)".to_owned(),
            None => path,
        };
        (field, message)
    })
}

fn value_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}
