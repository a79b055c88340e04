//! The process allocator for binaries that run models: mimalloc, told to keep freed pages.
//!
//! A training step or a teacher batch allocates and frees tensors of tens of MiB each time.
//! glibc's malloc serves those with fresh `mmap`s, and mimalloc by default hands freed pages back
//! to the kernel after 10 ms; either way the next step pays page faults and zeroing again (a
//! quarter of a MobileNetV2 training step in profiles). With purging off, freed pages are reused.
//! A process's resident memory then stays at its high-water mark, which a steady training or
//! labelling loop reaches in its first step anyway.

/// The global allocator type: `#[global_allocator] static A: Allocator = Allocator;`.
pub use mimalloc::MiMalloc as Allocator;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (the C library libmimalloc-sys 0.1 builds).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Turns off purging of freed pages. Call first thing in `main` of a binary whose global
/// allocator is [`Allocator`].
pub fn keep_freed_pages() {
    // SAFETY: mimalloc is linked (this crate depends on it) and its options may be set at any
    // time; -1 means "never purge".
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
