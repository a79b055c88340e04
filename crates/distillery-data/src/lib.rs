//! Faces before they become tensors: records as ingested, augmented views, and training batches.
//!
//! Ingest (AffectNet CSV, class folders, manifests), the synthetic face generator and the image
//! preprocessing that turns an encoded face into a model input live here. Storage is the cache crate's.

pub mod batch;
pub mod ingest;
pub mod record;
pub mod synth;
pub mod view;

pub use batch::Batch;
pub use record::{FaceRecord, Reject, Split};
pub use view::{View, views_for};
