//! Conversions between wire messages and domain types, with errors that name the offending field.
//!
//! Every conversion from the wire is fallible: a peer may send anything, and a bad field must come
//! back to it as a clear `INVALID_ARGUMENT` naming the field, never as a panic.

use distillery_core::{ClassSet, TeacherFingerprint};
use distillery_data::View;

use crate::v1;

/// A wire message that does not describe a valid domain value. `field` is the dotted path of the
/// offending field within the request (e.g. `spec.teacher.fingerprint`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid field `{field}`: {reason}")]
pub struct ConvertError {
    pub field: String,
    pub reason: String,
}

impl ConvertError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// `value` unless it is empty (after trimming), in which case an error names `field`.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, ConvertError> {
    let v = value.trim();
    if v.is_empty() { Err(ConvertError::new(field, "is required")) } else { Ok(v) }
}

/// Parses an optional teacher fingerprint: empty means `None`.
pub fn optional_fingerprint(field: &str, value: &str) -> Result<Option<TeacherFingerprint>, ConvertError> {
    if value.is_empty() {
        return Ok(None);
    }
    TeacherFingerprint::parse(value).map(Some).map_err(|e| ConvertError::new(field, e.to_string()))
}

/// Parses a required teacher fingerprint.
pub fn fingerprint(field: &str, value: &str) -> Result<TeacherFingerprint, ConvertError> {
    optional_fingerprint(field, value)?.ok_or_else(|| ConvertError::new(field, "is required"))
}

impl v1::TeacherKind {
    /// The name used on the command line and in configs: `emonet-8`, `emonet-5`, `onnx`, `student`.
    pub fn cli_name(self) -> &'static str {
        match self {
            v1::TeacherKind::Unspecified => "unspecified",
            v1::TeacherKind::Emonet8 => "emonet-8",
            v1::TeacherKind::Emonet5 => "emonet-5",
            v1::TeacherKind::Onnx => "onnx",
            v1::TeacherKind::Student => "student",
        }
    }

    /// Inverse of [`cli_name`](Self::cli_name) (case-insensitive; `emonet8` is accepted too).
    pub fn from_cli_name(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "emonet-8" | "emonet8" => Some(v1::TeacherKind::Emonet8),
            "emonet-5" | "emonet5" => Some(v1::TeacherKind::Emonet5),
            "onnx" => Some(v1::TeacherKind::Onnx),
            "student" => Some(v1::TeacherKind::Student),
            _ => None,
        }
    }
}

impl v1::TeacherSpec {
    /// Checks that the spec names a teacher that can be built; errors name `prefix.field`.
    pub fn validate(&self, prefix: &str) -> Result<(), ConvertError> {
        let key = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        let kind = v1::TeacherKind::try_from(self.kind)
            .map_err(|_| ConvertError::new(key("kind"), format!("unknown teacher kind {}", self.kind)))?;
        match kind {
            v1::TeacherKind::Unspecified => {
                return Err(ConvertError::new(
                    key("kind"),
                    "is required (emonet-8, emonet-5, onnx or student)",
                ));
            }
            v1::TeacherKind::Emonet8 | v1::TeacherKind::Emonet5 => {
                required(&key("weights_path"), &self.weights_path)?;
            }
            v1::TeacherKind::Onnx | v1::TeacherKind::Student => {
                required(&key("config_path"), &self.config_path)?;
            }
        }
        optional_fingerprint(&key("fingerprint"), &self.fingerprint)?;
        Ok(())
    }
}

impl From<&View> for v1::ViewSpec {
    fn from(v: &View) -> Self {
        Self { index: v.index, crop: v.crop.to_vec(), flip: v.flip }
    }
}

impl v1::ViewSpec {
    /// The domain view; an empty crop is the whole face. Errors name `field`.
    pub fn to_view(&self, field: &str) -> Result<View, ConvertError> {
        let crop = match self.crop.len() {
            0 => [0.0, 0.0, 1.0, 1.0],
            4 => [self.crop[0], self.crop[1], self.crop[2], self.crop[3]],
            n => {
                return Err(ConvertError::new(
                    format!("{field}.crop"),
                    format!("has {n} values, expected 0 or 4"),
                ));
            }
        };
        if crop.iter().any(|c| !c.is_finite()) || crop[2] <= 0.0 || crop[3] <= 0.0 {
            return Err(ConvertError::new(
                format!("{field}.crop"),
                format!("{crop:?} must be finite with positive width and height"),
            ));
        }
        Ok(View { index: self.index, crop, flip: self.flip })
    }
}

impl v1::EncodedImage {
    /// The face box, if any. Errors name `field`.
    pub fn face_box(&self, field: &str) -> Result<Option<[f32; 4]>, ConvertError> {
        match self.box_xywh.len() {
            0 => Ok(None),
            4 => {
                let b = [self.box_xywh[0], self.box_xywh[1], self.box_xywh[2], self.box_xywh[3]];
                if b.iter().any(|v| !v.is_finite()) || b[2] <= 0.0 || b[3] <= 0.0 {
                    return Err(ConvertError::new(
                        format!("{field}.box_xywh"),
                        format!("{b:?} must be finite with positive width and height"),
                    ));
                }
                Ok(Some(b))
            }
            n => Err(ConvertError::new(
                format!("{field}.box_xywh"),
                format!("has {n} values, expected 0 or 4"),
            )),
        }
    }
}

impl v1::Tensor {
    /// Packs `values` (row-major) as little-endian f32. Panics if `values.len()` is not the product
    /// of `shape`, which is a programming error on the sending side.
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "tensor shape {shape:?} vs {} values",
            values.len()
        );
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Self { shape: shape.iter().map(|&d| d as u64).collect(), data }
    }

    /// Unpacks to `(shape, values)`, checking that the byte length matches the shape. Errors name
    /// `field`.
    pub fn to_f32(&self, field: &str) -> Result<(Vec<usize>, Vec<f32>), ConvertError> {
        let shape: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| ConvertError::new(format!("{field}.shape"), format!("{shape:?} overflows")))?;
        if self.data.len() != n.saturating_mul(4) {
            return Err(ConvertError::new(
                format!("{field}.data"),
                format!("has {} bytes, shape {shape:?} needs {}", self.data.len(), n.saturating_mul(4)),
            ));
        }
        let values =
            self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok((shape, values))
    }
}

/// Class names in logit order, as sent in `ModelInfoResponse.classes`.
pub fn class_names(classes: &ClassSet) -> Vec<String> {
    classes.names().to_vec()
}

/// The class set of a `ModelInfoResponse`. Errors when it is empty.
pub fn class_set(field: &str, names: &[String]) -> Result<ClassSet, ConvertError> {
    if names.is_empty() {
        return Err(ConvertError::new(field, "is empty"));
    }
    Ok(ClassSet::new(names.iter().cloned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_round_trip_and_length_check() {
        let t = v1::Tensor::from_f32(&[1, 2, 1, 2], &[1.0, -2.5, 3.25, 0.0]);
        let (shape, vals) = t.to_f32("input.tensor").unwrap();
        assert_eq!(shape, vec![1, 2, 1, 2]);
        assert_eq!(vals, vec![1.0, -2.5, 3.25, 0.0]);
        let bad = v1::Tensor { shape: vec![2, 2], data: vec![0; 12] };
        let e = bad.to_f32("input.tensor").unwrap_err();
        assert_eq!(e.field, "input.tensor.data");
        assert!(e.reason.contains("12 bytes"), "{e}");
    }

    #[test]
    fn teacher_spec_validation_names_the_field() {
        let spec = v1::TeacherSpec { kind: v1::TeacherKind::Emonet8 as i32, ..Default::default() };
        assert_eq!(spec.validate("spec.teacher").unwrap_err().field, "spec.teacher.weights_path");
        let spec = v1::TeacherSpec::default();
        assert_eq!(spec.validate("spec.teacher").unwrap_err().field, "spec.teacher.kind");
        let spec = v1::TeacherSpec {
            kind: v1::TeacherKind::Onnx as i32,
            config_path: "t.toml".into(),
            fingerprint: "xyz".into(),
            ..Default::default()
        };
        assert_eq!(spec.validate("t").unwrap_err().field, "t.fingerprint");
        let spec = v1::TeacherSpec { kind: 99, ..Default::default() };
        assert!(spec.validate("").unwrap_err().reason.contains("99"));
    }

    #[test]
    fn view_round_trip_and_bad_crop() {
        let v = View { index: 3, crop: [0.1, 0.0, 0.8, 0.9], flip: true };
        let w = v1::ViewSpec::from(&v);
        assert_eq!(w.to_view("v").unwrap(), v);
        assert_eq!(v1::ViewSpec::default().to_view("v").unwrap(), View::plain());
        let bad = v1::ViewSpec { crop: vec![0.0, 0.0, 1.0], ..Default::default() };
        assert_eq!(bad.to_view("items[2].view").unwrap_err().field, "items[2].view.crop");
    }

    #[test]
    fn teacher_kind_names_round_trip() {
        for k in [
            v1::TeacherKind::Emonet8,
            v1::TeacherKind::Emonet5,
            v1::TeacherKind::Onnx,
            v1::TeacherKind::Student,
        ] {
            assert_eq!(v1::TeacherKind::from_cli_name(k.cli_name()), Some(k));
        }
        assert_eq!(v1::TeacherKind::from_cli_name("resnet"), None);
    }
}
