//! Multiply-accumulate counting from the shapes that actually flow through a model.
//!
//! Layers call [`record`] with the MACs of each convolution or linear layer they run. Counting is
//! off unless the forward pass runs inside [`count`], so the hot path pays only a thread-local read.
//! Counts are per batch; callers divide by the batch size for per-image figures.

use std::cell::Cell;

use serde::Serialize;

thread_local! {
    static MACS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` and returns its result with the MACs recorded while it ran (on this thread).
pub fn count<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let outer = MACS.with(|m| m.get());
    let (r, n) = isolated(true, f);
    if let Some(o) = outer {
        MACS.with(|m| m.set(Some(o + n)));
    }
    (r, n)
}

/// Whether this thread is counting (inside [`count`]).
pub fn counting() -> bool {
    MACS.with(|m| m.get().is_some())
}

/// Runs `f` with counting on or off as `counting` says, apart from whatever this thread was
/// counting before (restored afterwards, and not added to): for a worker thread running work on
/// behalf of another thread, which may be in the middle of other work of its own. Returns the
/// MACs `f` recorded (0 when not counting).
pub(crate) fn isolated<R>(counting: bool, f: impl FnOnce() -> R) -> (R, u64) {
    /// Puts this thread's own count back, also when `f` unwinds.
    struct Restore(Option<u64>);
    impl Drop for Restore {
        fn drop(&mut self) {
            MACS.with(|m| m.set(self.0));
        }
    }
    let restore = Restore(MACS.with(|m| m.replace(counting.then_some(0))));
    let r = f();
    let n = MACS.with(|m| m.get()).unwrap_or(0);
    drop(restore);
    (r, n)
}

/// Adds `macs` to the current count, if counting.
#[inline]
pub fn record(macs: u64) {
    MACS.with(|m| {
        if let Some(v) = m.get() {
            m.set(Some(v + macs));
        }
    });
}

/// MACs of a 2-D convolution producing `[n, c_out, h_out, w_out]` from `c_in_per_group` input
/// channels per group with a `kh`×`kw` kernel.
pub fn conv2d_macs(out_dims: &[usize], c_in_per_group: usize, kh: usize, kw: usize) -> u64 {
    out_dims.iter().map(|d| *d as u64).product::<u64>() * (c_in_per_group * kh * kw) as u64
}

/// MACs of a linear layer applied to `rows` rows.
pub fn linear_macs(rows: usize, d_in: usize, d_out: usize) -> u64 {
    (rows * d_in * d_out) as u64
}

/// What `distillery models` reports for one model.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelCost {
    pub name: String,
    pub kind: String,
    pub parameters: u64,
    /// Multiply-accumulates of convolutions and linear layers for one image.
    pub macs: u64,
    /// `[C, H, W]` of one input.
    pub input_shape: [usize; 3],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_is_scoped_and_nested() {
        record(5); // not counting: ignored
        let ((), outer) = count(|| {
            record(2);
            let ((), inner) = count(|| record(3));
            assert_eq!(inner, 3);
        });
        assert_eq!(outer, 5);
        assert_eq!(conv2d_macs(&[1, 8, 4, 4], 3, 3, 3), 8 * 16 * 27);
    }
}
