//! The architectures behind [`crate::student::Student`]: MobileNetV2, ResNet-18 and a tiny CNN.

pub mod mobilenetv2;
pub mod resnet;
pub mod tiny;
