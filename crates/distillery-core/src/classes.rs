//! Expression class sets and their canonical order.

use serde::{Deserialize, Serialize};

/// EmoNet's 8-class order (AffectNet labels 0–7).
pub const EMONET_8: [&str; 8] =
    ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"];

/// EmoNet's 5-class order (AffectNet labels 0–4).
pub const EMONET_5: [&str; 5] = ["neutral", "happy", "sad", "surprise", "fear"];

/// An ordered list of class names. Index `i` of a logit vector is class `names[i]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClassSet {
    names: Vec<String>,
}

impl ClassSet {
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self { names: names.into_iter().map(Into::into).collect() }
    }

    pub fn emonet8() -> Self {
        Self::new(EMONET_8)
    }

    pub fn emonet5() -> Self {
        Self::new(EMONET_5)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emonet_orders() {
        let c = ClassSet::emonet8();
        assert_eq!(c.len(), 8);
        assert_eq!(c.index_of("contempt"), Some(7));
        assert_eq!(c.index_of("Anger"), Some(6));
        assert_eq!(ClassSet::emonet5().index_of("contempt"), None);
    }
}
