//! The catalogue behind `distillery models`: every model Distillery ships, with parameters and
//! MACs measured from the layer graph (a real forward pass of one image under [`cost::count`]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::cost::{self, ModelCost};
use crate::emonet::{EmoNet, EmoNetVariant};
use crate::onnx::OnnxTeacher;
use crate::student::{StudentSpec, build_student, parameter_count};
use crate::teacher::Teacher;

/// Students listed by default: the paper's student and the other zoo members at their usual sizes.
pub const DEFAULT_STUDENTS: [&str; 5] =
    ["mobilenetv2@224", "mobilenetv2@112", "mobilenetv2:0.5@112", "resnet18@224", "tiny@64"];

/// Parameters and MACs of a student built from `spec` (`num_classes` expression classes).
pub fn student_cost(spec: &str, num_classes: usize) -> candle_core::Result<ModelCost> {
    let spec = StudentSpec::parse(spec, num_classes).map_err(candle_core::Error::wrap)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = build_student(&spec, vb)?;
    let s = spec.input_size;
    let x = Tensor::zeros((1, 3, s, s), DType::F32, &Device::Cpu)?;
    let (out, macs) = cost::count(|| model.forward_t(&x, false));
    out?;
    Ok(ModelCost {
        name: spec.name(),
        kind: "student".into(),
        parameters: parameter_count(&varmap),
        macs,
        input_shape: [3, s, s],
    })
}

/// Parameters and MACs of EmoNet (weights do not change either; zeros are used).
pub fn emonet_cost(variant: EmoNetVariant) -> candle_core::Result<ModelCost> {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let model = EmoNet::new(variant, vb)?;
    let x = Tensor::zeros((1, 3, 256, 256), DType::F32, &Device::Cpu)?;
    let (out, macs) = cost::count(|| model.forward_all(&x));
    out?;
    Ok(ModelCost {
        name: variant.name().into(),
        kind: "teacher".into(),
        parameters: model.parameter_count() as u64,
        macs,
        input_shape: [3, 256, 256],
    })
}

/// Parameters (initializer elements) and MACs of an ONNX teacher described by a TOML file.
pub fn onnx_cost(config: &Path) -> Result<ModelCost, crate::onnx::OnnxError> {
    let teacher = OnnxTeacher::from_config_file(config, &Device::Cpu)?;
    let cfg = teacher.config();
    let model = candle_onnx::read_file(cfg.model_path(config.parent().unwrap_or(Path::new("."))))
        .map_err(|e| crate::onnx::OnnxError::from(candle_core::Error::wrap(e)))?;
    let parameters = model
        .graph
        .as_ref()
        .map(|g| g.initializer.iter().map(|t| t.dims.iter().product::<i64>().max(0) as u64).sum())
        .unwrap_or(0);
    let pp = &teacher.info().preprocess;
    let [h, w] = pp.size;
    let shape = match pp.layout {
        distillery_core::Layout::Nchw => (1, pp.channels, h, w),
        distillery_core::Layout::Nhwc => (1, h, w, pp.channels),
    };
    let x = Tensor::zeros(shape, DType::F32, &Device::Cpu).map_err(crate::onnx::OnnxError::from)?;
    let (out, macs) = cost::count(|| teacher.forward(&x));
    out.map_err(crate::onnx::OnnxError::from)?;
    Ok(ModelCost {
        name: teacher.info().name.clone(),
        kind: "onnx-teacher".into(),
        parameters,
        macs,
        input_shape: [pp.channels, h, w],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mobilenetv2_costs_about_0_30_gmacs_at_224() {
        let c = student_cost("mobilenetv2@224", 8).unwrap();
        assert!((0.28e9..0.32e9).contains(&(c.macs as f64)), "{}", c.macs);
        assert_eq!(c.input_shape, [3, 224, 224]);
        let half = student_cost("mobilenetv2:0.5@112", 8).unwrap();
        assert!(half.macs * 8 < c.macs, "{} vs {}", half.macs, c.macs);
    }

    #[test]
    fn emonet8_has_the_published_size() {
        let c = emonet_cost(EmoNetVariant::Eight).unwrap();
        assert_eq!(c.parameters, 13_963_410);
        let g = c.macs as f64 / 1e9;
        assert!((g - 16.93).abs() < 0.17, "{g} GMACs");
    }
}
