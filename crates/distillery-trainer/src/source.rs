//! Where training batches come from: the [`BatchSource`] trait and an in-memory source.
//!
//! The loop only needs batches, the epoch they belong to, and a position it can store in a
//! checkpoint and seek back to. The teacher-cache stream implements it for real runs; the
//! in-memory source lets the loop (and small experiments) run without any storage.

use candle_core::Tensor;
use distillery_data::Batch;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::TensorContext;
use crate::{Error, Result};

/// An endless, resumable sequence of training batches, epoch after epoch.
pub trait BatchSource: Send {
    /// The next batch. Sources cycle through epochs without end; the trainer decides when to stop.
    fn next_batch(&mut self) -> Result<Batch>;
    /// 0-based epoch of the batch the next call returns.
    fn epoch(&self) -> usize;
    /// Batches in one epoch, when known.
    fn batches_per_epoch(&self) -> Option<usize>;
    /// Position of the next batch, to be stored in a checkpoint.
    fn position(&self) -> serde_json::Value;
    /// Moves to a position returned by [`BatchSource::position`] of a source opened the same way.
    fn seek(&mut self, position: &serde_json::Value) -> Result<()>;
}

/// Rows `idx` of every tensor of `b` (and of its ids).
pub fn select_rows(b: &Batch, idx: &[u32]) -> Result<Batch> {
    let dev = b.images.device();
    let ix = Tensor::new(idx, dev).op("select rows: index")?;
    let sel = |t: &Tensor| t.index_select(&ix, 0).op("select rows");
    let opt = |t: &Option<Tensor>| t.as_ref().map(sel).transpose();
    Ok(Batch {
        face_ids: idx.iter().map(|&i| b.face_ids[i as usize].clone()).collect(),
        views: idx.iter().map(|&i| b.views[i as usize]).collect(),
        images: sel(&b.images)?,
        labels: sel(&b.labels)?,
        label_mask: sel(&b.label_mask)?,
        va: sel(&b.va)?,
        va_mask: sel(&b.va_mask)?,
        teacher_logits: opt(&b.teacher_logits)?,
        teacher_va: opt(&b.teacher_va)?,
        teacher_embedding: opt(&b.teacher_embedding)?,
    })
}

/// Concatenates batches row-wise; all must carry the same optional teacher tensors.
pub fn concat(batches: &[Batch]) -> Result<Batch> {
    let first = batches.first().ok_or_else(|| Error::Data("concat of no batches".into()))?;
    let cat = |f: &dyn Fn(&Batch) -> &Tensor| {
        let ts: Vec<&Tensor> = batches.iter().map(f).collect();
        Tensor::cat(&ts, 0).op("concat batches")
    };
    let cat_opt = |f: &dyn Fn(&Batch) -> &Option<Tensor>| -> Result<Option<Tensor>> {
        if f(first).is_none() {
            return Ok(None);
        }
        let ts = batches
            .iter()
            .map(|b| {
                f(b).as_ref().ok_or_else(|| Error::Data("concat: some batches lack teacher outputs".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&ts, 0).op("concat batches")?))
    };
    Ok(Batch {
        face_ids: batches.iter().flat_map(|b| b.face_ids.iter().cloned()).collect(),
        views: batches.iter().flat_map(|b| b.views.iter().copied()).collect(),
        images: cat(&|b| &b.images)?,
        labels: cat(&|b| &b.labels)?,
        label_mask: cat(&|b| &b.label_mask)?,
        va: cat(&|b| &b.va)?,
        va_mask: cat(&|b| &b.va_mask)?,
        teacher_logits: cat_opt(&|b| &b.teacher_logits)?,
        teacher_va: cat_opt(&|b| &b.teacher_va)?,
        teacher_embedding: cat_opt(&|b| &b.teacher_embedding)?,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MemoryPosition {
    epoch: usize,
    batch: usize,
}

/// Batches drawn from rows held in memory, reshuffled every epoch from `seed` and the epoch number.
/// The last incomplete batch of an epoch is dropped, so every batch has `batch_size` rows.
pub struct MemorySource {
    rows: Batch,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    pos: MemoryPosition,
    order: Vec<u32>,
}

impl MemorySource {
    pub fn new(rows: Batch, batch_size: usize, seed: u64, shuffle: bool) -> Result<Self> {
        if batch_size == 0 || rows.len() < batch_size {
            return Err(Error::Data(format!(
                "in-memory source: {} rows cannot fill one batch of {batch_size}",
                rows.len()
            )));
        }
        let mut s = Self {
            rows,
            batch_size,
            seed,
            shuffle,
            pos: MemoryPosition { epoch: 0, batch: 0 },
            order: vec![],
        };
        s.order = s.order_for(0);
        Ok(s)
    }

    fn order_for(&self, epoch: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.rows.len() as u32).collect();
        if self.shuffle {
            let mut rng =
                ChaCha8Rng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            order.shuffle(&mut rng);
        }
        order
    }
}

impl BatchSource for MemorySource {
    fn next_batch(&mut self) -> Result<Batch> {
        let per = self.rows.len() / self.batch_size;
        if self.pos.batch >= per {
            self.pos = MemoryPosition { epoch: self.pos.epoch + 1, batch: 0 };
            self.order = self.order_for(self.pos.epoch);
        }
        let start = self.pos.batch * self.batch_size;
        let idx = &self.order[start..start + self.batch_size];
        let b = select_rows(&self.rows, idx)?;
        self.pos.batch += 1;
        Ok(b)
    }

    fn epoch(&self) -> usize {
        let per = self.rows.len() / self.batch_size;
        if self.pos.batch >= per { self.pos.epoch + 1 } else { self.pos.epoch }
    }

    fn batches_per_epoch(&self) -> Option<usize> {
        Some(self.rows.len() / self.batch_size)
    }

    fn position(&self) -> serde_json::Value {
        serde_json::to_value(self.pos).expect("position serialises")
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<()> {
        let p: MemoryPosition = serde_json::from_value(position.clone())
            .map_err(|e| Error::Data(format!("in-memory source: bad position {position}: {e}")))?;
        self.pos = p;
        self.order = self.order_for(p.epoch);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use distillery_core::FaceId;

    /// `n` rows of 1×2×2 images whose pixels equal the row index.
    pub(crate) fn rows(n: usize) -> Batch {
        let dev = Device::Cpu;
        let idx: Vec<f32> = (0..n).flat_map(|i| [i as f32; 4]).collect();
        Batch {
            face_ids: (0..n).map(|i| FaceId::of(&[i as u8], None)).collect(),
            views: vec![0; n],
            images: Tensor::from_vec(idx, (n, 1, 2, 2), &dev).unwrap(),
            labels: Tensor::from_vec((0..n as u32).map(|i| i % 3).collect::<Vec<_>>(), n, &dev).unwrap(),
            label_mask: Tensor::ones(n, DType::F32, &dev).unwrap(),
            va: Tensor::zeros((n, 2), DType::F32, &dev).unwrap(),
            va_mask: Tensor::ones(n, DType::F32, &dev).unwrap(),
            teacher_logits: None,
            teacher_va: None,
            teacher_embedding: None,
        }
    }

    fn ids(b: &Batch) -> Vec<u32> {
        b.images
            .flatten_from(1)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect()
    }

    #[test]
    fn memory_source_epochs_shuffle_and_resume() {
        let mut s = MemorySource::new(rows(10), 3, 5, true).unwrap();
        assert_eq!(s.batches_per_epoch(), Some(3));
        let mut seen = vec![];
        for _ in 0..3 {
            assert_eq!(s.epoch(), 0);
            seen.extend(ids(&s.next_batch().unwrap()));
        }
        assert_eq!(s.epoch(), 1);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9, "one epoch draws distinct rows");
        let e1: Vec<Vec<u32>> = (0..3).map(|_| ids(&s.next_batch().unwrap())).collect();
        let mut again = MemorySource::new(rows(10), 3, 5, true).unwrap();
        again.seek(&serde_json::json!({"epoch": 1, "batch": 1})).unwrap();
        assert_eq!(ids(&again.next_batch().unwrap()), e1[1]);
        assert!(MemorySource::new(rows(2), 3, 0, true).is_err());
    }

    #[test]
    fn select_and_concat_keep_rows_together() {
        let b = rows(5);
        let s = select_rows(&b, &[4, 1]).unwrap();
        assert_eq!(ids(&s), vec![4, 1]);
        assert_eq!(s.labels.to_vec1::<u32>().unwrap(), vec![1, 1]);
        assert_eq!(s.face_ids[0], b.face_ids[4]);
        let c = concat(&[s.clone(), select_rows(&b, &[0]).unwrap()]).unwrap();
        assert_eq!(ids(&c), vec![4, 1, 0]);
    }
}
