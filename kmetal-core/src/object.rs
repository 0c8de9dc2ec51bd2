//! The generic Kubernetes-shaped object: `apiVersion`, `kind`, `metadata`, `spec`, `status`.
//!
//! [`Resource`] is shared by every kind (like kube-rs' `Object<P, U>`). Decoding never stops at
//! the first bad field: each type error is recorded with its field path, the offending value is
//! set aside, and decoding goes on, so a manifest's problems are all reported in one pass.
//! Fields this version does not model are kept and written back out on serialization, so a
//! manifest written for a newer Kamaji survives a round-trip through kmetal.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use serde_path_to_error::Segment;

use crate::field::{FieldError, FieldErrors, Problem};
use crate::meta::ObjectMeta;

/// The API group and version of every kind kmetal models.
pub const API_VERSION: &str = "kamaji.clastix.io/v1alpha1";

/// What a kind contributes to [`Resource`]: its name, scope and status type.
pub trait ResourceSpec: Serialize + DeserializeOwned + Default + Clone + PartialEq {
    /// The `kind` string.
    const KIND: &'static str;
    /// Whether objects of this kind live in a namespace.
    const NAMESPACED: bool;
    /// The status type.
    type Status: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug;
}

/// A Kubernetes-shaped object of kind `S::KIND`.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource<S: ResourceSpec> {
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// Desired state.
    pub spec: S,
    /// Observed state, written by the operator.
    pub status: Option<S::Status>,
    /// Fields present in the source document that this version does not model, kept for
    /// round-trips (nested objects hold only their unknown keys).
    pub unknown_fields: Map<String, Value>,
}

impl<S: ResourceSpec> Default for Resource<S> {
    fn default() -> Self {
        Self {
            metadata: ObjectMeta::default(),
            spec: S::default(),
            status: None,
            unknown_fields: Map::new(),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Repr<S, T> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: S,
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    status: Option<T>,
}

/// A decoded object together with the problems found while decoding it.
#[derive(Debug)]
pub struct Decoded<T> {
    /// The object, with every badly typed field left at its default.
    pub object: T,
    /// One entry per badly typed field (empty when decoding was clean).
    pub problems: Vec<FieldError>,
}

impl<S: ResourceSpec> Resource<S> {
    /// An empty object with the given name (and namespace, for namespaced kinds).
    pub fn named(name: &str, namespace: Option<&str>) -> Self {
        let mut r = Self::default();
        r.metadata.name = Some(name.to_owned());
        if S::NAMESPACED {
            r.metadata.namespace = namespace.map(str::to_owned);
        }
        r
    }

    /// `Kind/name` or `Kind/namespace/name`, as the CLI prints it.
    pub fn display_name(&self) -> String {
        let name = self.metadata.name.as_deref().unwrap_or("<unnamed>");
        format!("{}/{name}", S::KIND)
    }

    /// Decodes an object from a JSON/YAML value tree, collecting every type error.
    ///
    /// `apiVersion` and `kind` are checked when present; a mismatch is a problem at that path.
    pub fn decode(raw: Value) -> Decoded<Self> {
        let mut problems = Vec::new();
        let mut work = raw.clone();
        let mut removed: Vec<(Vec<Segment>, Vec<usize>)> = Vec::new();
        // Each round removes one bad value, so the loop ends; the cap guards pathological input.
        for _ in 0..256 {
            match serde_path_to_error::deserialize::<_, Repr<S, S::Status>>(&work) {
                Ok(repr) => {
                    check_type_meta(&repr, &mut problems);
                    let object = Self {
                        metadata: repr.metadata,
                        spec: repr.spec,
                        status: repr.status,
                        unknown_fields: Map::new(),
                    };
                    let typed = object.typed_value();
                    let unknown_fields = match subtract(&raw, &typed) {
                        Some(Value::Object(m)) => m,
                        _ => Map::new(),
                    };
                    return Decoded {
                        object: Self {
                            unknown_fields,
                            ..object
                        },
                        problems,
                    };
                }
                Err(err) => {
                    let segments: Vec<Segment> = err.path().iter().cloned().collect();
                    let original = original_path(&segments, &removed);
                    let path = render_path(&original);
                    problems.push(FieldError::new(
                        if path.is_empty() { ".".into() } else { path },
                        Problem::WrongType(err.into_inner()),
                    ));
                    if !remove_at(&mut work, &segments, &mut removed) {
                        break;
                    }
                }
            }
        }
        Decoded {
            object: Self::default(),
            problems,
        }
    }

    /// Decodes strictly: any type problem is an error.
    pub fn from_value(raw: Value) -> Result<Self, FieldErrors> {
        let d = Self::decode(raw);
        if d.problems.is_empty() {
            Ok(d.object)
        } else {
            Err(FieldErrors(d.problems))
        }
    }

    fn typed_value(&self) -> Value {
        let repr = Repr {
            api_version: Some(API_VERSION.to_owned()),
            kind: Some(S::KIND.to_owned()),
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status: self.status.clone(),
        };
        // Serializing plain data structs into a Value cannot fail.
        serde_json::to_value(repr).unwrap_or(Value::Null)
    }

    /// The object as a value tree, unknown fields merged back in.
    pub fn to_value(&self) -> Value {
        let mut v = self.typed_value();
        merge_missing(&mut v, &Value::Object(self.unknown_fields.clone()));
        v
    }

    /// The object as YAML.
    pub fn to_yaml(&self) -> Result<String, serde_saphyr::SerializeError> {
        serde_saphyr::to_string(&self.to_value())
    }
}

fn check_type_meta<S: ResourceSpec, T>(repr: &Repr<S, T>, problems: &mut Vec<FieldError>) {
    if let Some(v) = &repr.api_version
        && v != API_VERSION
    {
        problems.push(FieldError::new(
            "apiVersion",
            Problem::NotOneOf {
                allowed: &[API_VERSION],
                found: v.clone(),
            },
        ));
    }
    if let Some(k) = &repr.kind
        && k != S::KIND
    {
        problems.push(FieldError::new(
            "kind",
            Problem::NotOneOf {
                allowed: std::slice::from_ref(&S::KIND),
                found: k.clone(),
            },
        ));
    }
}

impl<S: ResourceSpec> Serialize for Resource<S> {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de, S: ResourceSpec> Deserialize<'de> for Resource<S> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_value(v).map_err(serde::de::Error::custom)
    }
}

/// Renders a path as `spec.tolerations[0].key`.
fn render_path(segments: &[Segment]) -> String {
    let mut out = String::new();
    for seg in segments {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// Maps sequence indices in the working tree back to the source document's indices, undoing
/// the shifts caused by elements removed in earlier rounds.
fn original_path(segments: &[Segment], removed: &[(Vec<Segment>, Vec<usize>)]) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segments.len());
    for seg in segments {
        if let Segment::Seq { index } = seg {
            let mut idx = *index;
            if let Some((_, gone)) = removed.iter().find(|(p, _)| same_path(p, &out)) {
                // `gone` is sorted original indices; step over each one at or below idx.
                for g in gone {
                    if *g <= idx {
                        idx += 1;
                    }
                }
            }
            out.push(Segment::Seq { index: idx });
        } else {
            out.push(seg.clone());
        }
    }
    out
}

fn same_path(a: &[Segment], b: &[Segment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Segment::Seq { index: i }, Segment::Seq { index: j }) => i == j,
            (Segment::Map { key: k }, Segment::Map { key: l }) => k == l,
            (Segment::Enum { variant: v }, Segment::Enum { variant: w }) => v == w,
            (Segment::Unknown, Segment::Unknown) => true,
            _ => false,
        })
}

/// Removes the value at `segments` from the working tree. Returns false if nothing could be
/// removed (the error was at the root), which ends decoding.
fn remove_at(
    root: &mut Value,
    segments: &[Segment],
    removed: &mut Vec<(Vec<Segment>, Vec<usize>)>,
) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut cur = root;
    for seg in parents {
        let next = match (seg, cur) {
            (Segment::Map { key }, Value::Object(m)) => m.get_mut(key),
            (Segment::Seq { index }, Value::Array(a)) => a.get_mut(*index),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => return false,
        }
    }
    match (last, cur) {
        (Segment::Map { key }, Value::Object(m)) => m.remove(key).is_some(),
        (Segment::Seq { index }, Value::Array(a)) if *index < a.len() => {
            a.remove(*index);
            let parent_original = original_path(parents, removed);
            let original_index = match original_path(segments, removed).last() {
                Some(Segment::Seq { index }) => *index,
                _ => *index,
            };
            match removed
                .iter_mut()
                .find(|(p, _)| same_path(p, &parent_original))
            {
                Some((_, gone)) => {
                    gone.push(original_index);
                    gone.sort_unstable();
                }
                None => removed.push((parent_original, vec![original_index])),
            }
            true
        }
        _ => false,
    }
}

/// The parts of `raw` that `typed` does not hold: keys missing from `typed`, recursively.
fn subtract(raw: &Value, typed: &Value) -> Option<Value> {
    match (raw, typed) {
        (Value::Object(r), Value::Object(t)) => {
            let mut out = Map::new();
            for (k, rv) in r {
                match t.get(k) {
                    Some(tv) => {
                        if let Some(sub) = subtract(rv, tv) {
                            out.insert(k.clone(), sub);
                        }
                    }
                    None => {
                        out.insert(k.clone(), rv.clone());
                    }
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        // Scalars and lists the typed model holds are owned by it.
        _ => None,
    }
}

/// Adds keys of `extra` that `target` lacks, recursively; `target` wins on conflicts.
fn merge_missing(target: &mut Value, extra: &Value) {
    if let (Value::Object(t), Value::Object(e)) = (target, extra) {
        for (k, ev) in e {
            match t.get_mut(k) {
                Some(tv) => merge_missing(tv, ev),
                None => {
                    t.insert(k.clone(), ev.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantControlPlane;
    use serde_json::json;

    #[test]
    fn collects_every_type_error_with_paths() {
        let raw = json!({
            "apiVersion": API_VERSION,
            "kind": "TenantControlPlane",
            "metadata": {"name": "t"},
            "spec": {
                "networkProfile": {"port": "high", "certSANs": ["ok", 5, "fine", 7]},
                "controlPlane": {"deployment": {"replicas": [1]}}
            }
        });
        let d = TenantControlPlane::decode(raw);
        let paths: Vec<_> = d.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            // Document order, with indices of the source document.
            [
                "spec.networkProfile.port",
                "spec.networkProfile.certSANs[1]",
                "spec.networkProfile.certSANs[3]",
                "spec.controlPlane.deployment.replicas",
            ]
        );
        assert_eq!(d.object.spec.network_profile.cert_sans, ["ok", "fine"]);
    }

    #[test]
    fn unknown_fields_survive_round_trip() {
        let raw = json!({
            "apiVersion": API_VERSION,
            "kind": "TenantControlPlane",
            "metadata": {"name": "t", "managedFields": [{"manager": "kubectl"}]},
            "spec": {
                "kubernetes": {"version": "v1.30.2", "futureKnob": {"x": 1}},
                "controlPlane": {"service": {"serviceType": "ClusterIP"}}
            },
            "extraTop": true
        });
        let tcp = TenantControlPlane::from_value(raw.clone()).unwrap();
        assert_eq!(tcp.unknown_fields["extraTop"], json!(true));
        assert_eq!(tcp.to_value(), raw);
    }

    #[test]
    fn wrong_kind_is_a_problem() {
        let d = TenantControlPlane::decode(json!({"apiVersion": "v1", "kind": "DataStore"}));
        let paths: Vec<_> = d.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["apiVersion", "kind"]);
    }
}
