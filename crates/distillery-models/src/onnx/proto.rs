//! Reading ONNX protobuf values: tensors (initializers, `Constant` values) and node attributes.
//!
//! Integer tensors of every width become `I64` candle tensors: in the graphs we run they only carry
//! shapes, axes and indices, and one integer type keeps the shape plumbing simple.

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::{AttributeProto, NodeProto, TensorProto, tensor_proto::DataType};

/// Converts a tensor proto to a candle tensor on `device`. Errors name the tensor.
pub(crate) fn tensor_from_proto(t: &TensorProto, device: &Device) -> Result<Tensor, String> {
    let name = &t.name;
    if t.data_location == candle_onnx::onnx::tensor_proto::DataLocation::External as i32 {
        return Err(format!("tensor `{name}` uses external data, which is not supported"));
    }
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("tensor `{name}` has a negative dimension {d}"));
        }
        dims.push(d as usize);
    }
    let numel: usize = dims.iter().product();
    let dt = DataType::try_from(t.data_type)
        .map_err(|_| format!("tensor `{name}` has unknown data type {}", t.data_type))?;
    let raw = &t.raw_data;
    let from_raw = !raw.is_empty();
    let check = |n: usize| -> Result<(), String> {
        if n == numel {
            Ok(())
        } else {
            Err(format!("tensor `{name}` holds {n} values but its shape {dims:?} needs {numel}"))
        }
    };
    let tensor = match dt {
        DataType::Float => {
            let v: Vec<f32> = if from_raw {
                chunks::<4>(raw, name)?.map(f32::from_le_bytes).collect()
            } else {
                t.float_data.clone()
            };
            check(v.len())?;
            Tensor::from_vec(v, dims.as_slice(), device)
        }
        DataType::Double => {
            let v: Vec<f64> = if from_raw {
                chunks::<8>(raw, name)?.map(f64::from_le_bytes).collect()
            } else {
                t.double_data.clone()
            };
            check(v.len())?;
            Tensor::from_vec(v, dims.as_slice(), device)
        }
        DataType::Float16 => {
            let v: Vec<half::f16> = if from_raw {
                chunks::<2>(raw, name)?.map(|b| half::f16::from_bits(u16::from_le_bytes(b))).collect()
            } else {
                // int32_data carries the 16 bits of each value.
                t.int32_data.iter().map(|&b| half::f16::from_bits(b as u16)).collect()
            };
            check(v.len())?;
            Tensor::from_vec(v, dims.as_slice(), device)
        }
        DataType::Int64 => {
            let v: Vec<i64> = if from_raw {
                chunks::<8>(raw, name)?.map(i64::from_le_bytes).collect()
            } else {
                t.int64_data.clone()
            };
            check(v.len())?;
            Tensor::from_vec(v, dims.as_slice(), device)
        }
        DataType::Int32
        | DataType::Int16
        | DataType::Int8
        | DataType::Uint8
        | DataType::Uint16
        | DataType::Bool => {
            let v: Vec<i64> = if from_raw {
                match dt {
                    DataType::Int32 => {
                        chunks::<4>(raw, name)?.map(|b| i32::from_le_bytes(b) as i64).collect()
                    }
                    DataType::Int16 => {
                        chunks::<2>(raw, name)?.map(|b| i16::from_le_bytes(b) as i64).collect()
                    }
                    DataType::Uint16 => {
                        chunks::<2>(raw, name)?.map(|b| u16::from_le_bytes(b) as i64).collect()
                    }
                    DataType::Int8 => raw.iter().map(|&b| b as i8 as i64).collect(),
                    _ => raw.iter().map(|&b| b as i64).collect(),
                }
            } else {
                t.int32_data.iter().map(|&x| x as i64).collect()
            };
            check(v.len())?;
            Tensor::from_vec(v, dims.as_slice(), device)
        }
        DataType::Uint32 | DataType::Uint64 => {
            let v: Vec<i64> = if from_raw {
                if dt == DataType::Uint32 {
                    chunks::<4>(raw, name)?.map(|b| u32::from_le_bytes(b) as i64).collect()
                } else {
                    chunks::<8>(raw, name)?.map(|b| u64::from_le_bytes(b) as i64).collect()
                }
            } else {
                t.uint64_data.iter().map(|&x| x as i64).collect()
            };
            check(v.len())?;
            Tensor::from_vec(v, dims.as_slice(), device)
        }
        other => return Err(format!("tensor `{name}` has unsupported data type {other:?}")),
    };
    tensor.map_err(|e| format!("tensor `{name}`: {e}"))
}

fn chunks<'a, const N: usize>(
    raw: &'a [u8],
    name: &str,
) -> Result<impl Iterator<Item = [u8; N]> + 'a, String> {
    if !raw.len().is_multiple_of(N) {
        return Err(format!("tensor `{name}` has {} raw bytes, not a multiple of {N}", raw.len()));
    }
    Ok(raw.chunks_exact(N).map(|c| c.try_into().expect("exact chunk")))
}

/// The candle dtype an ONNX `Cast` target maps to.
pub(crate) fn cast_dtype(to: i64) -> Option<DType> {
    match DataType::try_from(to as i32).ok()? {
        DataType::Float => Some(DType::F32),
        DataType::Double => Some(DType::F64),
        DataType::Float16 => Some(DType::F16),
        DataType::Int64
        | DataType::Int32
        | DataType::Int16
        | DataType::Int8
        | DataType::Uint8
        | DataType::Uint16
        | DataType::Uint32
        | DataType::Uint64
        | DataType::Bool => Some(DType::I64),
        _ => None,
    }
}

/// Typed access to a node's attributes.
pub(crate) struct Attrs<'a> {
    node: &'a NodeProto,
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(node: &'a NodeProto) -> Self {
        Self { node }
    }

    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub(crate) fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map_or(default, |a| a.i)
    }

    pub(crate) fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map_or(default, |a| a.f)
    }

    pub(crate) fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }

    pub(crate) fn floats(&self, name: &str) -> Option<Vec<f32>> {
        self.get(name).map(|a| a.floats.clone())
    }

    pub(crate) fn string(&self, name: &str) -> Option<String> {
        self.get(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }

    pub(crate) fn tensor(&self, name: &str) -> Option<&'a TensorProto> {
        self.get(name).and_then(|a| a.t.as_ref())
    }
}
