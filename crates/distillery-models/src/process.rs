//! Process-wide settings for binaries that run models, applied first thing in `main`.

/// candle's environment variable for how long its elementwise worker spins after each op.
const CANDLE_SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// How long (spin iterations) candle's elementwise worker waits for the next op before parking,
/// unless the environment sets [`CANDLE_SPIN`]. candle's default (25,000) keeps that thread
/// busy well into the next op, which in our models is usually one of our own kernels running on
/// rayon's threads: on a machine with few cores the spinning thread takes a core from them
/// (MobileNetV2 training steps ~8 % faster on two cores with the shorter wait).
pub const CANDLE_SPIN_LIMIT: u32 = 500;

/// Keeps freed pages ([`crate::alloc::keep_freed_pages`]) and shortens candle's spin-wait (see
/// [`CANDLE_SPIN_LIMIT`]).
///
/// # Safety
/// Sets an environment variable: call it before any other thread of the process starts (first
/// thing in a plain `main`, not inside an async runtime's).
pub unsafe fn prepare() {
    crate::alloc::keep_freed_pages();
    if std::env::var_os(CANDLE_SPIN).is_none() {
        // SAFETY: no other thread exists yet (the caller's contract).
        unsafe { std::env::set_var(CANDLE_SPIN, CANDLE_SPIN_LIMIT.to_string()) };
    }
}
