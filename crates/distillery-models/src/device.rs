//! Device names as users write them: `cpu`, `cuda` (GPU 0) or `cuda:N`.
//!
//! Every model runs on any candle device. The CPU has hand-written kernels (see [`crate::nn`]);
//! other devices take compositions of candle ops chosen to keep the number of kernel launches small
//! (e.g. a depthwise convolution is nine shifted multiply-adds, not one convolution per channel).

use candle_core::Device;

/// A parsed device name; [`DeviceName::open`] opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    Cpu,
    Cuda(usize),
}

impl DeviceName {
    /// Parses `cpu` (or empty), `cuda`/`gpu` (ordinal 0) or `cuda:N`, ignoring case and spaces.
    pub fn parse(s: &str) -> Result<Self, String> {
        let l = s.trim().to_ascii_lowercase();
        match l.as_str() {
            "cpu" | "" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("`{s}` is not cpu, cuda or cuda:N")),
            },
        }
    }

    /// Opens the device. A CUDA device fails in a build without the `cuda` feature, or on a
    /// machine without that GPU; the error says which.
    pub fn open(self) -> candle_core::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                let hint = if cfg!(feature = "cuda") {
                    "is the GPU there and its driver loaded?"
                } else {
                    "this build has no CUDA support: build with `--features cuda`"
                };
                candle_core::Error::Msg(format!("cuda:{n}: {e} ({hint})"))
            }),
        }
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Lets f32 matrix products on CUDA devices take TF32 tensor cores (inputs rounded to a 10-bit
/// mantissa, f32 accumulation), as PyTorch's cuDNN convolutions do by default. Process-wide; no
/// effect on the CPU.
pub fn set_tf32(on: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
}

/// The device a benchmark or example runs on: `$DISTILLERY_DEVICE` (default `cpu`);
/// `DISTILLERY_TF32=1` turns on [`set_tf32`].
pub fn from_env() -> candle_core::Result<(DeviceName, Device)> {
    let raw = std::env::var("DISTILLERY_DEVICE").unwrap_or_default();
    let name =
        DeviceName::parse(&raw).map_err(|e| candle_core::Error::Msg(format!("DISTILLERY_DEVICE: {e}")))?;
    set_tf32(std::env::var("DISTILLERY_TF32").is_ok_and(|v| v == "1"));
    Ok((name, name.open()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (s, want) in [
            ("cpu", DeviceName::Cpu),
            ("", DeviceName::Cpu),
            (" CUDA ", DeviceName::Cuda(0)),
            ("gpu", DeviceName::Cuda(0)),
            ("cuda:3", DeviceName::Cuda(3)),
        ] {
            assert_eq!(DeviceName::parse(s), Ok(want), "{s:?}");
            assert_eq!(DeviceName::parse(&want.to_string()), Ok(want));
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let e = DeviceName::parse(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("cuda:N"), "{e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let e = DeviceName::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("cuda:0") && e.contains("--features cuda"), "{e}");
    }
}
