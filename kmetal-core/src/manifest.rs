//! Manifest files: multi-document YAML (and JSON, a YAML subset), dispatched on
//! `apiVersion`/`kind`.
//!
//! Kinds kmetal models decode into [`Object`]s; documents of other kinds are reported as
//! [`Content::Other`] rather than silently dropped; `kind: List` documents are expanded.

use std::path::{Path, PathBuf};

use serde_json::Value;
use serde_saphyr::Spanned;

use crate::datastore::{DataStore, DataStoreSpec};
use crate::field::{FieldError, FieldErrors};
use crate::object::{API_VERSION, Resource, ResourceSpec};
use crate::tenant::{TenantControlPlane, TenantControlPlaneSpec};
use crate::validate::{validate_datastore, validate_tenant};

/// A whole file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The text is not YAML (or JSON).
    #[error("line {line}, column {column}")]
    Syntax {
        /// 1-based line, 0 when unknown.
        line: u64,
        /// 1-based column, 0 when unknown.
        column: u64,
        /// The parser's error (boxed: it is large and errors travel by value).
        #[source]
        source: Box<serde_saphyr::Error>,
    },
}

/// Why one document in a file is not a usable object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// The document is a scalar or a list, not a mapping.
    #[error("document is not a mapping")]
    NotAMapping,
    /// `apiVersion` or `kind` is missing or not a string.
    #[error("{field}: required")]
    MissingTypeMeta {
        /// `apiVersion` or `kind`.
        field: &'static str,
    },
    /// A kind in kmetal's API group that does not exist (usually a typo).
    #[error("kind {kind:?} is not a kind of {API_VERSION} (known: TenantControlPlane, DataStore)")]
    UnknownKind {
        /// The kind given.
        kind: String,
    },
}

/// A decoded object of a kind kmetal models.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Object {
    /// A TenantControlPlane.
    TenantControlPlane(Box<TenantControlPlane>),
    /// A DataStore.
    DataStore(Box<DataStore>),
}

impl Object {
    /// `Kind/name`.
    pub fn display_name(&self) -> String {
        match self {
            Object::TenantControlPlane(t) => t.display_name(),
            Object::DataStore(d) => d.display_name(),
        }
    }

    /// Runs the kind's validator.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        match self {
            Object::TenantControlPlane(t) => validate_tenant(t),
            Object::DataStore(d) => validate_datastore(d),
        }
    }

    /// The object as a value tree (unknown fields included).
    pub fn to_value(&self) -> Value {
        match self {
            Object::TenantControlPlane(t) => t.to_value(),
            Object::DataStore(d) => d.to_value(),
        }
    }
}

/// What one document held.
#[derive(Debug)]
#[non_exhaustive]
pub enum Content {
    /// A kind kmetal models; `problems` are the type errors found while decoding.
    Object {
        /// The object (badly typed fields left at their defaults).
        object: Object,
        /// Type errors, with field paths.
        problems: Vec<FieldError>,
    },
    /// A document of a kind kmetal does not model, skipped.
    Other {
        /// Its apiVersion.
        api_version: String,
        /// Its kind.
        kind: String,
        /// Its metadata.name, if any.
        name: Option<String>,
    },
    /// Not usable at all.
    Invalid(DocumentError),
}

/// One document of a manifest file.
#[derive(Debug)]
pub struct Document {
    /// 1-based line where the document (or, for List items, the List) starts.
    pub line: u64,
    /// What it held.
    pub content: Content,
}

impl Document {
    /// A label for messages: `Kind/name`, or `document at line N`.
    pub fn label(&self) -> String {
        match &self.content {
            Content::Object { object, .. } => object.display_name(),
            Content::Other { kind, name, .. } => {
                format!("{kind}/{}", name.as_deref().unwrap_or("<unnamed>"))
            }
            Content::Invalid(_) => format!("document at line {}", self.line),
        }
    }

    /// Every problem of the document: decoding errors first, then the validator's, skipping
    /// validator findings on fields that already failed to decode.
    pub fn problems(&self) -> Vec<String> {
        match &self.content {
            Content::Object { object, problems } => {
                let mut out: Vec<String> = problems.iter().map(ToString::to_string).collect();
                if let Err(errs) = object.validate() {
                    out.extend(
                        errs.0
                            .iter()
                            .filter(|e| !problems.iter().any(|p| p.path == e.path))
                            .map(ToString::to_string),
                    );
                }
                out
            }
            Content::Other { .. } => Vec::new(),
            Content::Invalid(e) => vec![e.to_string()],
        }
    }
}

/// Parses every document in `text`.
///
/// ```
/// use kmetal_core::manifest::{parse_str, Content};
/// let docs = parse_str("apiVersion: kamaji.clastix.io/v1alpha1\nkind: DataStore\nmetadata: {name: x}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n").unwrap();
/// assert_eq!(docs.len(), 2);
/// assert!(matches!(docs[1].content, Content::Other { .. }));
/// assert_eq!(docs[1].line, 5);
/// ```
pub fn parse_str(text: &str) -> Result<Vec<Document>, ManifestError> {
    let docs: Vec<Spanned<Value>> = serde_saphyr::from_multiple(text).map_err(|source| {
        let (line, column) = source
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        ManifestError::Syntax {
            line,
            column,
            source: Box::new(source),
        }
    })?;
    let mut out = Vec::with_capacity(docs.len());
    for d in docs {
        let line = d.referenced.line();
        expand(d.value, line, &mut out);
    }
    Ok(out)
}

/// Reads and parses a file.
pub fn parse_file(path: &Path) -> Result<Vec<Document>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_str(&text)
}

fn expand(value: Value, line: u64, out: &mut Vec<Document>) {
    if value.is_null() {
        return;
    }
    let Value::Object(map) = &value else {
        out.push(Document {
            line,
            content: Content::Invalid(DocumentError::NotAMapping),
        });
        return;
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str);
    let kind = map.get("kind").and_then(Value::as_str);
    let (api_version, kind) = match (api_version, kind) {
        (None, _) => {
            out.push(Document {
                line,
                content: Content::Invalid(DocumentError::MissingTypeMeta {
                    field: "apiVersion",
                }),
            });
            return;
        }
        (_, None) => {
            out.push(Document {
                line,
                content: Content::Invalid(DocumentError::MissingTypeMeta { field: "kind" }),
            });
            return;
        }
        (Some(a), Some(k)) => (a.to_owned(), k.to_owned()),
    };
    if api_version == "v1" && kind == "List" {
        if let Value::Object(mut map) = value
            && let Some(Value::Array(items)) = map.remove("items")
        {
            for item in items {
                expand(item, line, out);
            }
        }
        return;
    }
    let group = api_version.split('/').next().unwrap_or_default();
    let ours = API_VERSION.split('/').next().unwrap_or_default();
    let content = match kind.as_str() {
        k if k == TenantControlPlaneSpec::KIND && group == ours => {
            decode::<TenantControlPlaneSpec>(value, |t| Object::TenantControlPlane(Box::new(t)))
        }
        k if k == DataStoreSpec::KIND && group == ours => {
            decode::<DataStoreSpec>(value, |d| Object::DataStore(Box::new(d)))
        }
        _ if group == ours => Content::Invalid(DocumentError::UnknownKind { kind }),
        _ => Content::Other {
            name: map
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            api_version,
            kind,
        },
    };
    out.push(Document { line, content });
}

fn decode<S: ResourceSpec>(value: Value, wrap: impl Fn(Resource<S>) -> Object) -> Content {
    let d = Resource::<S>::decode(value);
    Content::Object {
        object: wrap(d.object),
        problems: d.problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_error_has_position() {
        let err = parse_str("a: [1, 2\nb: c\n").unwrap_err();
        match err {
            ManifestError::Syntax { line, .. } => assert!(line >= 1),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn json_and_list_and_typo_kinds() {
        let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "kamaji.clastix.io/v1alpha1", "kind": "DataStore", "metadata": {"name": "a"}},
            {"apiVersion": "kamaji.clastix.io/v1alpha1", "kind": "TenantControlplane", "metadata": {"name": "b"}}
        ]}"#;
        let docs = parse_str(text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].label(), "DataStore/a");
        assert!(matches!(
            &docs[1].content,
            Content::Invalid(DocumentError::UnknownKind { kind }) if kind == "TenantControlplane"
        ));
    }

    #[test]
    fn decode_and_validation_problems_combine_without_repeats() {
        let text = "apiVersion: kamaji.clastix.io/v1alpha1\nkind: TenantControlPlane\nmetadata: {name: t}\nspec:\n  controlPlane: {service: {serviceType: 5}}\n  networkProfile: {port: 0}\n";
        let docs = parse_str(text).unwrap();
        let problems = docs[0].problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("spec.controlPlane.service.serviceType: invalid type"));
        assert_eq!(problems[1], "spec.kubernetes.version: required");
        assert_eq!(problems[2], "spec.networkProfile.port: must be 1..=65535");
    }

    #[test]
    fn missing_type_meta_and_scalars() {
        let docs = parse_str("kind: DataStore\n---\njust a string\n---\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].problems(), ["apiVersion: required"]);
        assert_eq!(docs[1].problems(), ["document is not a mapping"]);
    }
}
