//! How a model wants its input: the contract between the data layer (which applies it to images)
//! and the models (which declare it). Part of a teacher's fingerprint.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Memory layout of one input tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

/// Interpolation used when resizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    #[default]
    Bilinear,
    Nearest,
}

/// Preprocessing applied to an RGB face crop before it reaches a model.
///
/// Pixel values `v` in 0..=255 become `(v * scale - mean[c]) / std[c]`, per channel, in RGB order
/// (or a single grey channel when `channels == 1`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Output height and width in pixels.
    pub size: [usize; 2],
    /// 3 (RGB) or 1 (grey).
    #[serde(default = "three")]
    pub channels: usize,
    #[serde(default)]
    pub layout: Layout,
    /// Multiplier applied to 0..255 values first (1/255 maps to 0..1).
    #[serde(default = "one")]
    pub scale: f32,
    #[serde(default)]
    pub mean: Vec<f32>,
    #[serde(default)]
    pub std: Vec<f32>,
    /// Zero-pad the crop to a centred square before resizing.
    #[serde(default)]
    pub pad_to_square: bool,
    #[serde(default)]
    pub filter: ResizeFilter,
}

fn three() -> usize {
    3
}
fn one() -> f32 {
    1.0
}

impl Preprocess {
    /// EmoNet's preprocessing: RGB, 256×256, values /255, no mean/std.
    pub fn emonet() -> Self {
        Self {
            size: [256, 256],
            channels: 3,
            layout: Layout::Nchw,
            scale: 1.0 / 255.0,
            mean: vec![],
            std: vec![],
            pad_to_square: false,
            filter: ResizeFilter::Bilinear,
        }
    }

    /// A plain RGB preprocessing to `side`×`side`, values /255 (used by students).
    pub fn unit_rgb(side: usize) -> Self {
        Self { size: [side, side], ..Self::emonet() }
    }

    /// Checks the spec; errors name the field, prefixed by `prefix` (e.g. `teacher.preprocess`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let key = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        if self.size[0] == 0 || self.size[1] == 0 || self.size[0] > 4096 || self.size[1] > 4096 {
            return Err(Error::config(key("size"), format!("{:?} is not in 1..=4096", self.size)));
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::config(key("channels"), format!("{} is not 1 or 3", self.channels)));
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            return Err(Error::config(key("scale"), "must be finite and non-zero"));
        }
        for (name, v) in [("mean", &self.mean), ("std", &self.std)] {
            if !v.is_empty() && v.len() != self.channels {
                return Err(Error::config(
                    key(name),
                    format!("has {} values, expected 0 or {}", v.len(), self.channels),
                ));
            }
        }
        if self.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(Error::config(key("std"), "values must be finite and non-zero"));
        }
        Ok(())
    }

    /// Bytes that identify this preprocessing in a teacher fingerprint.
    pub fn fingerprint_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("preprocess serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_bad_field() {
        let mut p = Preprocess::emonet();
        p.validate("teacher").unwrap();
        p.mean = vec![0.5];
        let e = p.validate("teacher.preprocess").unwrap_err().to_string();
        assert!(e.contains("teacher.preprocess.mean"), "{e}");
        let mut p = Preprocess::emonet();
        p.channels = 2;
        assert!(p.validate("").unwrap_err().to_string().contains("`channels`"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = toml::from_str::<Preprocess>("size = [1, 1]\nsclae = 2.0\n").unwrap_err();
        assert!(e.to_string().contains("sclae"), "{e}");
    }

    #[test]
    fn fingerprint_bytes_change_with_content() {
        let a = Preprocess::emonet();
        let mut b = a.clone();
        b.pad_to_square = true;
        assert_ne!(a.fingerprint_bytes(), b.fingerprint_bytes());
    }
}
