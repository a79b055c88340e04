//! Operator tests on tiny hand-built ONNX graphs, checked against hand-computed values or naive
//! loops written straight from the ONNX operator definitions.

use candle_core::{Device, Tensor};
use distillery_models::onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataType,
};
use distillery_models::onnx::{OnnxError, OnnxGraph};
use prost::Message;

type R = Result<(), Box<dyn std::error::Error>>;

fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}
fn attr_f(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Float as i32, f: v, ..Default::default() }
}
fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn attr_s(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn init_f32(name: &str, dims: &[i64], data: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

fn init_f32_raw(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn init_i64(name: &str, dims: &[i64], data: Vec<i64>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Int64 as i32,
        int64_data: data,
        ..Default::default()
    }
}

fn model(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: &[&str],
    outputs: &[&str],
    opset: i64,
) -> ModelProto {
    let vi = |n: &&str| ValueInfoProto { name: n.to_string(), ..Default::default() };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(GraphProto {
            node: nodes,
            name: "test".into(),
            initializer: inits,
            input: inputs.iter().map(vi).collect(),
            output: outputs.iter().map(vi).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn run1(m: &ModelProto, x: &Tensor) -> Result<Tensor, OnnxError> {
    let g = OnnxGraph::from_model(m, &Device::Cpu)?;
    let out = m.graph.as_ref().unwrap().output[0].name.clone();
    Ok(g.run(&[("x", x)], &[out.as_str()])?.remove(0))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Naive ONNX Conv (2-D): pads are [top, left, bottom, right].
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f32],
    [n, c, h, w]: [usize; 4],
    k: &[f32],
    [co, cig, kh, kw]: [usize; 4],
    bias: Option<&[f32]>,
    group: usize,
    [sh, sw]: [usize; 2],
    [dh, dw]: [usize; 2],
    [pt, pl, pb, pr]: [usize; 4],
) -> (Vec<f32>, [usize; 4]) {
    let oh = (h + pt + pb - ((kh - 1) * dh + 1)) / sh + 1;
    let ow = (w + pl + pr - ((kw - 1) * dw + 1)) / sw + 1;
    let cog = co / group;
    let mut y = vec![0f32; n * co * oh * ow];
    for b in 0..n {
        for o in 0..co {
            let g = o / cog;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias.map_or(0.0, |bb| bb[o]);
                    for ci in 0..cig {
                        let cin = g * cig + ci;
                        for i in 0..kh {
                            for j in 0..kw {
                                let iy = (oy * sh + i * dh) as isize - pt as isize;
                                let ix = (ox * sw + j * dw) as isize - pl as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                acc += x[((b * c + cin) * h + iy as usize) * w + ix as usize]
                                    * k[((o * cig + ci) * kh + i) * kw + j];
                            }
                        }
                    }
                    y[((b * co + o) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    (y, [n, co, oh, ow])
}

struct ConvCase {
    x: [usize; 4],
    k: [usize; 4],
    group: usize,
    strides: [usize; 2],
    dil: [usize; 2],
    pads: [usize; 4],
}

fn check_conv(case: ConvCase, seed: u64) -> R {
    let xn: usize = case.x.iter().product();
    let kn: usize = case.k.iter().product();
    let xv = values(xn, seed);
    let kv = values(kn, seed + 1);
    let bv = values(case.k[0], seed + 2);
    let m = model(
        vec![node(
            "Conv",
            "conv",
            &["x", "w", "b"],
            &["y"],
            vec![
                attr_i("group", case.group as i64),
                attr_ints("strides", &case.strides.map(|v| v as i64)),
                attr_ints("dilations", &case.dil.map(|v| v as i64)),
                attr_ints("pads", &case.pads.map(|v| v as i64)),
                attr_ints("kernel_shape", &[case.k[2] as i64, case.k[3] as i64]),
            ],
        )],
        vec![
            init_f32_raw("w", &case.k.map(|v| v as i64), &kv),
            init_f32("b", &[case.k[0] as i64], bv.clone()),
        ],
        &["x"],
        &["y"],
        13,
    );
    let x = Tensor::from_vec(xv.clone(), case.x.to_vec(), &Device::Cpu)?;
    let y = run1(&m, &x)?;
    let (want, dims) =
        naive_conv(&xv, case.x, &kv, case.k, Some(&bv), case.group, case.strides, case.dil, case.pads);
    assert_eq!(y.dims(), &dims);
    let d = max_diff(&y.flatten_all()?.to_vec1::<f32>()?, &want);
    assert!(d < 1e-5, "conv max diff {d}");
    Ok(())
}

#[test]
fn conv_groups_asymmetric_pads_dilation_and_stride_match_naive_loop() -> R {
    // Grouped (2 groups), asymmetric pads, dilation 2.
    check_conv(
        ConvCase {
            x: [2, 4, 7, 6],
            k: [6, 2, 3, 3],
            group: 2,
            strides: [1, 1],
            dil: [2, 2],
            pads: [1, 0, 2, 1],
        },
        1,
    )?;
    // Plain conv, stride 2, symmetric pads (candle's own padding path).
    check_conv(
        ConvCase {
            x: [1, 3, 8, 9],
            k: [5, 3, 3, 2],
            group: 1,
            strides: [2, 2],
            dil: [1, 1],
            pads: [1, 1, 1, 1],
        },
        2,
    )?;
    // Depthwise, channel multiplier 2, stride 2, asymmetric pads (direct kernel).
    check_conv(
        ConvCase {
            x: [2, 3, 9, 8],
            k: [6, 1, 3, 3],
            group: 3,
            strides: [2, 2],
            dil: [1, 1],
            pads: [0, 1, 1, 0],
        },
        3,
    )?;
    // Depthwise with dilation and different strides per axis.
    check_conv(
        ConvCase {
            x: [1, 4, 10, 11],
            k: [4, 1, 3, 2],
            group: 4,
            strides: [1, 2],
            dil: [2, 1],
            pads: [2, 1, 0, 1],
        },
        4,
    )?;
    Ok(())
}

#[test]
fn conv_auto_pad_same_upper_keeps_ceil_size() -> R {
    let xv = values(2 * 5 * 7, 9);
    let kv = values(2 * 2 * 3 * 3, 10);
    let m = model(
        vec![node(
            "Conv",
            "c",
            &["x", "w"],
            &["y"],
            vec![attr_s("auto_pad", "SAME_UPPER"), attr_ints("strides", &[2, 2])],
        )],
        vec![init_f32("w", &[2, 2, 3, 3], kv.clone())],
        &["x"],
        &["y"],
        11,
    );
    let x = Tensor::from_vec(xv.clone(), (1, 2, 5, 7), &Device::Cpu)?;
    let y = run1(&m, &x)?;
    // out = ceil(in / 2): 3×4. Total pad per axis: (3-1)*2+3-5 = 2 → (1, 1); (4-1)*2+3-7 = 2 → (1, 1).
    let (want, dims) =
        naive_conv(&xv, [1, 2, 5, 7], &kv, [2, 2, 3, 3], None, 1, [2, 2], [1, 1], [1, 1, 1, 1]);
    assert_eq!(y.dims(), &dims);
    assert!(max_diff(&y.flatten_all()?.to_vec1()?, &want) < 1e-5);
    Ok(())
}

#[test]
fn max_pool_ceil_mode_with_asymmetric_pads_hand_computed() -> R {
    // x[r][c] = 4r + c on 4×4; kernel 3, stride 2, pads top 0 left 1 bottom 0 right 0, ceil_mode.
    // Rows: floor would give 1 window, ceil gives 2 (rows 0..3 and 2..4 clipped to 2..3).
    // Cols: windows {-1,0,1} and {1,2,3}.
    let m = model(
        vec![node(
            "MaxPool",
            "mp",
            &["x"],
            &["y"],
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_ints("pads", &[0, 1, 0, 0]),
                attr_i("ceil_mode", 1),
            ],
        )],
        vec![],
        &["x"],
        &["y"],
        12,
    );
    let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
    let y = run1(&m, &x)?;
    assert_eq!(y.dims(), &[1, 1, 2, 2]);
    assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![9.0, 11.0, 13.0, 15.0]);
    // Negative values: padding must be −∞, not zero.
    let y = run1(&m, &x.affine(-1.0, -1.0)?)?;
    assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![-1.0, -2.0, -9.0, -10.0]);
    Ok(())
}

#[test]
fn max_pool_ceil_mode_drops_windows_starting_in_end_padding() -> R {
    // in 5, k 2, s 2, pads (0, 1): floor → 3 windows; ceil → ceil(4/2)+1 = 3, none dropped.
    // in 4, k 2, s 2, pads (0, 1): ceil → ceil(3/2)+1 = 3, but window 3 starts at 4 = in → dropped.
    let m = model(
        vec![node(
            "MaxPool",
            "mp",
            &["x"],
            &["y"],
            vec![
                attr_ints("kernel_shape", &[1, 2]),
                attr_ints("strides", &[1, 2]),
                attr_ints("pads", &[0, 0, 0, 1]),
                attr_i("ceil_mode", 1),
            ],
        )],
        vec![],
        &["x"],
        &["y"],
        12,
    );
    let x = Tensor::new(&[[[[1f32, 5.0, 2.0, 7.0]]]], &Device::Cpu)?;
    let y = run1(&m, &x)?;
    assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![5.0, 7.0]);
    Ok(())
}

#[test]
fn average_pool_count_include_pad_hand_computed() -> R {
    // x = 1..9 on 3×3, kernel 2, stride 2, pads top 1 left 1 (bottom/right 0).
    // Windows: {1}, {2,3}, {4,7}, {5,6,8,9}; with padding counted every divisor is 4.
    let build = |include: i64| {
        model(
            vec![node(
                "AveragePool",
                "ap",
                &["x"],
                &["y"],
                vec![
                    attr_ints("kernel_shape", &[2, 2]),
                    attr_ints("strides", &[2, 2]),
                    attr_ints("pads", &[1, 1, 0, 0]),
                    attr_i("count_include_pad", include),
                ],
            )],
            vec![],
            &["x"],
            &["y"],
            11,
        )
    };
    let x = Tensor::arange(1f32, 10.0, &Device::Cpu)?.reshape((1, 1, 3, 3))?;
    let inc = run1(&build(1), &x)?.flatten_all()?.to_vec1::<f32>()?;
    let exc = run1(&build(0), &x)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(max_diff(&inc, &[0.25, 1.25, 2.75, 7.0]) < 1e-6, "{inc:?}");
    assert!(max_diff(&exc, &[1.0, 2.5, 5.5, 7.0]) < 1e-6, "{exc:?}");
    Ok(())
}

#[test]
fn average_pool_ceil_mode_does_not_count_ceil_overflow() -> R {
    // 1×3 row [1, 2, 4], kernel 2, stride 2, ceil_mode, include pad: last window covers [4, overflow]
    // and divides by 1 (the overflow cell is not an explicit pad).
    let m = model(
        vec![node(
            "AveragePool",
            "ap",
            &["x"],
            &["y"],
            vec![
                attr_ints("kernel_shape", &[1, 2]),
                attr_ints("strides", &[1, 2]),
                attr_i("ceil_mode", 1),
                attr_i("count_include_pad", 1),
            ],
        )],
        vec![],
        &["x"],
        &["y"],
        11,
    );
    let y = run1(&m, &Tensor::new(&[[[[1f32, 2.0, 4.0]]]], &Device::Cpu)?)?;
    assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![1.5, 4.0]);
    Ok(())
}

#[test]
fn gemm_trans_b_alpha_beta_matches_naive() -> R {
    let (m_, k, n) = (3, 4, 5);
    let a = values(m_ * k, 20);
    let b = values(n * k, 21);
    let c = values(n, 22);
    let mdl = model(
        vec![node(
            "Gemm",
            "fc",
            &["x", "b", "c"],
            &["y"],
            vec![attr_i("transB", 1), attr_f("alpha", 0.5), attr_f("beta", 2.0)],
        )],
        vec![init_f32("b", &[n as i64, k as i64], b.clone()), init_f32("c", &[n as i64], c.clone())],
        &["x"],
        &["y"],
        13,
    );
    let y = run1(&mdl, &Tensor::from_vec(a.clone(), (m_, k), &Device::Cpu)?)?;
    let mut want = vec![0f32; m_ * n];
    for i in 0..m_ {
        for j in 0..n {
            let dot: f32 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
            want[i * n + j] = 0.5 * dot + 2.0 * c[j];
        }
    }
    assert_eq!(y.dims(), &[m_, n]);
    assert!(max_diff(&y.flatten_all()?.to_vec1()?, &want) < 1e-5);
    Ok(())
}

#[test]
fn reshape_transpose_concat_pad_softmax_chain() -> R {
    // x [2,3,4] → Reshape [0,-1] → [2,12] → Transpose → [12,2] → Concat(const [12,1], axis 1)
    // → [12,3] → Pad rows (1, 0), cols (0, 2) with 5 → [13,5] → Softmax(axis -1).
    let xv = values(24, 30);
    let cv = values(12, 31);
    let m = model(
        vec![
            node("Reshape", "r", &["x", "shape"], &["r"], vec![]),
            node("Transpose", "t", &["r"], &["t"], vec![attr_ints("perm", &[1, 0])]),
            node("Concat", "c", &["t", "k"], &["c"], vec![attr_i("axis", -1)]),
            node("Pad", "p", &["c", "pads", "pv"], &["p"], vec![]),
            node("Softmax", "s", &["p"], &["y"], vec![attr_i("axis", -1)]),
        ],
        vec![
            init_i64("shape", &[2], vec![0, -1]),
            init_f32("k", &[12, 1], cv.clone()),
            init_i64("pads", &[4], vec![1, 0, 0, 2]),
            init_f32("pv", &[], vec![5.0]),
        ],
        &["x"],
        &["y"],
        13,
    );
    let y = run1(&m, &Tensor::from_vec(xv.clone(), (2, 3, 4), &Device::Cpu)?)?;
    assert_eq!(y.dims(), &[13, 5]);
    // Naive: row r (1..13) = [x[0][r-1], x[1][r-1], k[r-1], 5, 5]; row 0 = all 5.
    let mut want = Vec::new();
    for r in 0..13 {
        let row: Vec<f32> =
            if r == 0 { vec![5.0; 5] } else { vec![xv[r - 1], xv[12 + r - 1], cv[r - 1], 5.0, 5.0] };
        let mx = row.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = row.iter().map(|v| (v - mx).exp()).collect();
        let s: f32 = e.iter().sum();
        want.extend(e.iter().map(|v| v / s));
    }
    assert!(max_diff(&y.flatten_all()?.to_vec1()?, &want) < 1e-6);
    Ok(())
}

#[test]
fn softmax_axis_semantics_follow_opset() -> R {
    // Opset 11: axis 1 of [2,3,4] normalises the 12 trailing values together; opset 13: only axis 1.
    let xv = values(24, 40);
    let x = Tensor::from_vec(xv.clone(), (2, 3, 4), &Device::Cpu)?;
    let mk = |opset| {
        model(
            vec![node("Softmax", "s", &["x"], &["y"], vec![attr_i("axis", 1)])],
            vec![],
            &["x"],
            &["y"],
            opset,
        )
    };
    let old = run1(&mk(11), &x)?.flatten_all()?.to_vec1::<f32>()?;
    let new = run1(&mk(13), &x)?.flatten_all()?.to_vec1::<f32>()?;
    let sm = |idx: &[usize]| -> Vec<f32> {
        let e: Vec<f32> = idx.iter().map(|&i| xv[i].exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    };
    let mut want_old = vec![0f32; 24];
    let mut want_new = vec![0f32; 24];
    for b in 0..2 {
        let idx: Vec<usize> = (0..12).map(|i| b * 12 + i).collect();
        for (i, v) in idx.iter().zip(sm(&idx)) {
            want_old[*i] = v;
        }
        for j in 0..4 {
            let idx: Vec<usize> = (0..3).map(|c| b * 12 + c * 4 + j).collect();
            for (i, v) in idx.iter().zip(sm(&idx)) {
                want_new[*i] = v;
            }
        }
    }
    assert!(max_diff(&old, &want_old) < 1e-6);
    assert!(max_diff(&new, &want_new) < 1e-6);
    Ok(())
}

#[test]
fn dynamic_flatten_chain_shape_gather_unsqueeze_concat_reshape() -> R {
    // What exporters emit for `x.view(x.size(0), -1)`; runs for any batch size.
    let m = model(
        vec![
            node("Shape", "sh", &["x"], &["s"], vec![]),
            node("Gather", "g", &["s", "zero"], &["n"], vec![attr_i("axis", 0)]),
            node("Unsqueeze", "u", &["n", "axes"], &["n1"], vec![]),
            node("Concat", "c", &["n1", "minus1"], &["shape"], vec![attr_i("axis", 0)]),
            node("Reshape", "r", &["x", "shape"], &["y"], vec![]),
        ],
        vec![
            init_i64("zero", &[], vec![0]),
            init_i64("axes", &[1], vec![0]),
            init_i64("minus1", &[1], vec![-1]),
        ],
        &["x"],
        &["y"],
        13,
    );
    for n in [1usize, 3] {
        let x = Tensor::from_vec(values(n * 12, 50), (n, 3, 2, 2), &Device::Cpu)?;
        let y = run1(&m, &x)?;
        assert_eq!(y.dims(), &[n, 12]);
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(())
}

#[test]
fn activations_batchnorm_clip_flatten_and_binary_broadcasting() -> R {
    // y = Flatten(Clip(LeakyRelu(BN(x)) , -0.5, 0.5) * s - t) with s: [C,1,1] and t scalar.
    let c = 2;
    let (scale, bias, mean, var) =
        (vec![1.5f32, -0.5], vec![0.1f32, 0.2], vec![0.3f32, -0.1], vec![0.5f32, 2.0]);
    let m = model(
        vec![
            node(
                "BatchNormalization",
                "bn",
                &["x", "sc", "bi", "mu", "var"],
                &["b"],
                vec![attr_f("epsilon", 1e-3)],
            ),
            node("LeakyRelu", "lr", &["b"], &["l"], vec![attr_f("alpha", 0.1)]),
            node("Clip", "cl", &["l", "lo", "hi"], &["c"], vec![]),
            node("Mul", "mul", &["c", "s"], &["m"], vec![]),
            node("Sub", "sub", &["m", "t"], &["d"], vec![]),
            node("Flatten", "f", &["d"], &["y"], vec![attr_i("axis", 1)]),
        ],
        vec![
            init_f32("sc", &[2], scale.clone()),
            init_f32("bi", &[2], bias.clone()),
            init_f32("mu", &[2], mean.clone()),
            init_f32("var", &[2], var.clone()),
            init_f32("lo", &[], vec![-0.5]),
            init_f32("hi", &[], vec![0.5]),
            init_f32("s", &[2, 1, 1], vec![2.0, -3.0]),
            init_f32("t", &[], vec![0.25]),
        ],
        &["x"],
        &["y"],
        13,
    );
    let xv = values(2 * c * 3 * 3, 60);
    let y = run1(&m, &Tensor::from_vec(xv.clone(), (2, c, 3, 3), &Device::Cpu)?)?;
    assert_eq!(y.dims(), &[2, 18]);
    let s = [2.0f32, -3.0];
    let want: Vec<f32> = xv
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / 9) % c;
            let b = (v - mean[ch]) / (var[ch] + 1e-3).sqrt() * scale[ch] + bias[ch];
            let l = if b >= 0.0 { b } else { 0.1 * b };
            l.clamp(-0.5, 0.5) * s[ch] - 0.25
        })
        .collect();
    assert!(max_diff(&y.flatten_all()?.to_vec1()?, &want) < 1e-5);
    Ok(())
}

#[test]
fn clip_attributes_before_opset_11() -> R {
    let m = model(
        vec![node("Clip", "cl", &["x"], &["y"], vec![attr_f("min", 0.0), attr_f("max", 6.0)])],
        vec![],
        &["x"],
        &["y"],
        6,
    );
    let y = run1(&m, &Tensor::new(&[-1f32, 3.0, 7.0], &Device::Cpu)?)?;
    assert_eq!(y.to_vec1::<f32>()?, vec![0.0, 3.0, 6.0]);
    Ok(())
}

#[test]
fn constant_subgraphs_are_folded_and_bytes_round_trip() -> R {
    // w2 = Constant * 2 is folded at load; only the Add remains per batch.
    let konst = TensorProto {
        dims: vec![3],
        data_type: DataType::Float as i32,
        float_data: vec![1.0, 2.0, 3.0],
        ..Default::default()
    };
    let m = model(
        vec![
            node(
                "Constant",
                "k",
                &[],
                &["k"],
                vec![AttributeProto {
                    name: "value".into(),
                    r#type: AttributeType::Tensor as i32,
                    t: Some(konst),
                    ..Default::default()
                }],
            ),
            node("Mul", "dbl", &["k", "two"], &["k2"], vec![]),
            node("Identity", "id", &["k2"], &["k3"], vec![]),
            node("Add", "add", &["x", "k3"], &["y"], vec![]),
        ],
        vec![init_f32("two", &[], vec![2.0])],
        &["x"],
        &["y"],
        13,
    );
    let g = OnnxGraph::from_bytes(&m.encode_to_vec(), &Device::Cpu)?;
    assert_eq!(g.num_steps(), 1);
    assert_eq!(g.input_names(), vec!["x"]);
    let y = g.run(&[("x", &Tensor::new(&[[1f32, 1.0, 1.0]], &Device::Cpu)?)], &["y", "k3"])?;
    assert_eq!(y[0].flatten_all()?.to_vec1::<f32>()?, vec![3.0, 5.0, 7.0]);
    assert_eq!(y[1].to_vec1::<f32>()?, vec![2.0, 4.0, 6.0]);
    Ok(())
}

#[test]
fn out_of_order_nodes_are_sorted() -> R {
    let m = model(
        vec![node("Relu", "second", &["a"], &["y"], vec![]), node("Neg", "first", &["x"], &["a"], vec![])],
        vec![],
        &["x"],
        &["y"],
        13,
    );
    let y = run1(&m, &Tensor::new(&[-1f32, 2.0], &Device::Cpu)?)?;
    assert_eq!(y.to_vec1::<f32>()?, vec![1.0, 0.0]);
    Ok(())
}

#[test]
fn unsupported_op_error_names_op_and_node() {
    let m = model(
        vec![node("Einsum", "mixer_7", &["x"], &["y"], vec![attr_s("equation", "ij->ji")])],
        vec![],
        &["x"],
        &["y"],
        13,
    );
    let e = OnnxGraph::from_model(&m, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("Einsum") && e.contains("mixer_7"), "{e}");
    let m = model(
        vec![node("Pad", "pad_3", &["x"], &["y"], vec![attr_s("mode", "reflect")])],
        vec![],
        &["x"],
        &["y"],
        13,
    );
    let e = OnnxGraph::from_model(&m, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("pad_3") && e.contains("reflect"), "{e}");
    let m = model(vec![node("Relu", "r", &["nowhere"], &["y"], vec![])], vec![], &["x"], &["y"], 13);
    let e = OnnxGraph::from_model(&m, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("nowhere") && e.contains("`r`"), "{e}");
}

#[test]
fn runtime_errors_name_the_node() -> R {
    let m = model(
        vec![node("Reshape", "bad_reshape", &["x", "shape"], &["y"], vec![])],
        vec![init_i64("shape", &[1], vec![5])],
        &["x"],
        &["y"],
        13,
    );
    let e = run1(&m, &Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu)?).unwrap_err().to_string();
    assert!(e.contains("bad_reshape") && e.contains("Reshape"), "{e}");
    Ok(())
}

#[test]
fn conv_counts_macs() -> R {
    let m = model(
        vec![node("Conv", "c", &["x", "w"], &["y"], vec![attr_ints("pads", &[1, 1, 1, 1])])],
        vec![init_f32("w", &[4, 2, 3, 3], values(72, 70))],
        &["x"],
        &["y"],
        13,
    );
    let g = OnnxGraph::from_model(&m, &Device::Cpu)?;
    let x = Tensor::zeros((1, 2, 5, 5), candle_core::DType::F32, &Device::Cpu)?;
    let (r, macs) = distillery_models::cost::count(|| g.run(&[("x", &x)], &["y"]));
    r?;
    assert_eq!(macs, 4 * 25 * 2 * 9);
    Ok(())
}

/// A separable block as mobile networks write it: dense conv → Relu → depthwise conv → Relu →
/// Add with the first activation → Relu, plus a conv output read twice (not fusable). Every Relu
/// with a single reader is folded into its Conv or Add; values are those of the naive loops, and
/// the pre-activation values fusion removed can still be asked for by name.
#[test]
fn relus_fold_into_their_conv_or_add_without_changing_values() -> R {
    let (n, c, h, w) = (2, 4, 6, 5);
    let xv = values(n * c * h * w, 31);
    let (k1, b1) = (values(c * c * 9, 32), values(c, 33));
    let (k2, b2) = (values(c * 9, 34), values(c, 35));
    let (k3, b3) = (values(c * c, 36), values(c, 37));
    let pads = attr_ints("pads", &[1, 1, 1, 1]);
    let m = model(
        vec![
            node("Conv", "dense", &["x", "w1", "b1"], &["c1"], vec![pads.clone()]),
            node("Relu", "r1", &["c1"], &["a1"], vec![]),
            node("Conv", "dw", &["a1", "w2", "b2"], &["c2"], vec![pads, attr_i("group", c as i64)]),
            node("Relu", "r2", &["c2"], &["a2"], vec![]),
            node("Add", "add", &["a2", "a1"], &["s"], vec![]),
            node("Relu", "r3", &["s"], &["a3"], vec![]),
            // Read by both the Relu and the Add: stays unfused.
            node("Conv", "pw", &["a3", "w3", "b3"], &["c3"], vec![]),
            node("Relu", "r4", &["c3"], &["a4"], vec![]),
            node("Add", "out", &["a4", "c3"], &["y"], vec![]),
        ],
        vec![
            init_f32_raw("w1", &[c as i64, c as i64, 3, 3], &k1),
            init_f32("b1", &[c as i64], b1.clone()),
            init_f32_raw("w2", &[c as i64, 1, 3, 3], &k2),
            init_f32("b2", &[c as i64], b2.clone()),
            init_f32_raw("w3", &[c as i64, c as i64, 1, 1], &k3),
            init_f32("b3", &[c as i64], b3.clone()),
        ],
        &["x"],
        &["y"],
        13,
    );
    let g = OnnxGraph::from_model(&m, &Device::Cpu)?;
    assert_eq!(g.num_steps(), 6, "r1, r2 and r3 fold away; r4 must stay");

    let dims = [n, c, h, w];
    let relu = |v: Vec<f32>| v.into_iter().map(|v| v.max(0.0)).collect::<Vec<f32>>();
    let (c1, _) = naive_conv(&xv, dims, &k1, [c, c, 3, 3], Some(&b1), 1, [1, 1], [1, 1], [1, 1, 1, 1]);
    let a1 = relu(c1.clone());
    let (c2, _) = naive_conv(&a1, dims, &k2, [c, 1, 3, 3], Some(&b2), c, [1, 1], [1, 1], [1, 1, 1, 1]);
    let a3 = relu(relu(c2).iter().zip(&a1).map(|(a, b)| a + b).collect());
    let (c3, _) = naive_conv(&a3, dims, &k3, [c, c, 1, 1], Some(&b3), 1, [1, 1], [1, 1], [0, 0, 0, 0]);
    let y: Vec<f32> = relu(c3.clone()).iter().zip(&c3).map(|(a, b)| a + b).collect();

    let x = Tensor::from_vec(xv, dims.to_vec(), &Device::Cpu)?;
    let got = g.run(&[("x", &x)], &["y"])?.remove(0).flatten_all()?.to_vec1::<f32>()?;
    let d = max_diff(&got, &y);
    assert!(d < 1e-4, "fused graph max diff {d}");
    // `c1` (before the folded Relu) is still a value of the graph.
    assert!(c1.iter().any(|&v| v < 0.0), "the test needs negative pre-activations");
    let out = g.run(&[("x", &x)], &["c1", "y"])?;
    let d = max_diff(&out[0].flatten_all()?.to_vec1::<f32>()?, &c1);
    assert!(d < 1e-4, "pre-activation max diff {d}");
    let d = max_diff(&out[1].flatten_all()?.to_vec1::<f32>()?, &y);
    assert!(d < 1e-4, "unfused plan max diff {d}");
    Ok(())
}

/// A depthwise-separable convolution: depthwise 3×3 (+ Relu) → 1×1. Planning folds the Relu and
/// then the depthwise conv into the pointwise one (one step); the values are the naive loops',
/// with symmetric pads (the one-pass path) and asymmetric ones (run as two convolutions), and the
/// depthwise output can still be asked for by name.
#[test]
fn depthwise_then_pointwise_runs_as_one_step() -> R {
    let (n, c, co, h, w) = (2, 6, 5, 9, 7);
    let xv = values(n * c * h * w, 41);
    let (kd, bd) = (values(c * 9, 42), values(c, 43));
    let (kp, bp) = (values(co * c, 44), values(co, 45));
    for (pads, stride) in [([1usize, 1, 1, 1], 2usize), ([1, 1, 1, 1], 1), ([0, 1, 1, 0], 1)] {
        let m = model(
            vec![
                node(
                    "Conv",
                    "dw",
                    &["x", "wd", "bd"],
                    &["d"],
                    vec![
                        attr_ints("pads", &pads.map(|v| v as i64)),
                        attr_ints("strides", &[stride as i64, stride as i64]),
                        attr_i("group", c as i64),
                    ],
                ),
                node("Relu", "r", &["d"], &["a"], vec![]),
                node("Conv", "pw", &["a", "wp", "bp"], &["y"], vec![]),
            ],
            vec![
                init_f32_raw("wd", &[c as i64, 1, 3, 3], &kd),
                init_f32("bd", &[c as i64], bd.clone()),
                init_f32_raw("wp", &[co as i64, c as i64, 1, 1], &kp),
                init_f32("bp", &[co as i64], bp.clone()),
            ],
            &["x"],
            &["y"],
            13,
        );
        let g = OnnxGraph::from_model(&m, &Device::Cpu)?;
        assert_eq!(g.num_steps(), 1, "pads {pads:?}: Relu and depthwise conv fold into the pointwise conv");
        let (d, ddims) =
            naive_conv(&xv, [n, c, h, w], &kd, [c, 1, 3, 3], Some(&bd), c, [stride, stride], [1, 1], pads);
        let a: Vec<f32> = d.iter().map(|v| v.max(0.0)).collect();
        let (y, ydims) =
            naive_conv(&a, ddims, &kp, [co, c, 1, 1], Some(&bp), 1, [1, 1], [1, 1], [0, 0, 0, 0]);
        let x = Tensor::from_vec(xv.clone(), vec![n, c, h, w], &Device::Cpu)?;
        let got = g.run(&[("x", &x)], &["y"])?.remove(0);
        assert_eq!(got.dims(), &ydims);
        let diff = max_diff(&got.flatten_all()?.to_vec1::<f32>()?, &y);
        assert!(diff < 1e-4, "pads {pads:?} stride {stride}: max diff {diff}");
        let got_d = g.run(&[("x", &x)], &["d"])?.remove(0).flatten_all()?.to_vec1::<f32>()?;
        assert!(max_diff(&got_d, &d) < 1e-4, "the depthwise output by name");
    }
    Ok(())
}

/// Additions folded into the convolution producing one operand: `relu(a1 + pw(dw(a1)))` (a
/// residual block) runs as one step onto a copy of `a1`, and `pw2(y1) + k` with a broadcast
/// constant `k` keeps its value through the broadcasting path. Values are the naive loops'.
#[test]
fn additions_fold_into_the_convolution_before_them() -> R {
    let (n, c, h, w) = (2, 4, 6, 5);
    let xv = values(n * c * h * w, 51);
    let (k1, b1) = (values(c * c * 9, 52), values(c, 53));
    let (kd, bd) = (values(c * 9, 54), values(c, 55));
    let (kp, bp) = (values(c * c, 56), values(c, 57));
    let (kq, bq) = (values(c * c, 58), values(c, 59));
    let kc = values(c, 60);
    let pads = attr_ints("pads", &[1, 1, 1, 1]);
    let m = model(
        vec![
            node("Conv", "dense", &["x", "w1", "b1"], &["c1"], vec![pads.clone()]),
            node("Relu", "r1", &["c1"], &["a1"], vec![]),
            node("Conv", "dw", &["a1", "wd", "bd"], &["d"], vec![pads, attr_i("group", c as i64)]),
            node("Conv", "pw", &["d", "wp", "bp"], &["p"], vec![]),
            node("Add", "res", &["a1", "p"], &["s"], vec![]),
            node("Relu", "r2", &["s"], &["y1"], vec![]),
            node("Conv", "pw2", &["y1", "wq", "bq"], &["q"], vec![]),
            node("Add", "shift", &["q", "k"], &["y"], vec![]),
        ],
        vec![
            init_f32_raw("w1", &[c as i64, c as i64, 3, 3], &k1),
            init_f32("b1", &[c as i64], b1.clone()),
            init_f32_raw("wd", &[c as i64, 1, 3, 3], &kd),
            init_f32("bd", &[c as i64], bd.clone()),
            init_f32_raw("wp", &[c as i64, c as i64, 1, 1], &kp),
            init_f32("bp", &[c as i64], bp.clone()),
            init_f32_raw("wq", &[c as i64, c as i64, 1, 1], &kq),
            init_f32("bq", &[c as i64], bq.clone()),
            init_f32("k", &[1, c as i64, 1, 1], kc.clone()),
        ],
        &["x"],
        &["y"],
        13,
    );
    let g = OnnxGraph::from_model(&m, &Device::Cpu)?;
    assert_eq!(g.num_steps(), 3, "conv+relu, separable+add+relu, conv+add");

    let dims = [n, c, h, w];
    let relu = |v: &[f32]| v.iter().map(|v| v.max(0.0)).collect::<Vec<f32>>();
    let (c1, _) = naive_conv(&xv, dims, &k1, [c, c, 3, 3], Some(&b1), 1, [1, 1], [1, 1], [1, 1, 1, 1]);
    let a1 = relu(&c1);
    let (d, _) = naive_conv(&a1, dims, &kd, [c, 1, 3, 3], Some(&bd), c, [1, 1], [1, 1], [1, 1, 1, 1]);
    let (p, _) = naive_conv(&d, dims, &kp, [c, c, 1, 1], Some(&bp), 1, [1, 1], [1, 1], [0, 0, 0, 0]);
    let y1 = relu(&a1.iter().zip(&p).map(|(a, b)| a + b).collect::<Vec<f32>>());
    let (q, _) = naive_conv(&y1, dims, &kq, [c, c, 1, 1], Some(&bq), 1, [1, 1], [1, 1], [0, 0, 0, 0]);
    let y: Vec<f32> = q.iter().enumerate().map(|(i, v)| v + kc[(i / (h * w)) % c]).collect();

    let x = Tensor::from_vec(xv, dims.to_vec(), &Device::Cpu)?;
    let got = g.run(&[("x", &x)], &["y"])?.remove(0);
    assert_eq!(got.dims(), &dims);
    let diff = max_diff(&got.flatten_all()?.to_vec1::<f32>()?, &y);
    assert!(diff < 1e-4, "fused additions max diff {diff}");
    let got_p = g.run(&[("x", &x)], &["p"])?.remove(0).flatten_all()?.to_vec1::<f32>()?;
    assert!(max_diff(&got_p, &p) < 1e-4, "the pointwise output before the addition, by name");
    Ok(())
}

/// A dense block as face-api's expression net writes it: `out1 = relu(conv(x))`, then three
/// depthwise-separable convolutions, each reading the ReLU of the running sum of all outputs so
/// far, and the block's output `relu(out1 + (out2 + (out3 + out4)))`. Planning folds every sum
/// into the convolution that finishes it: the first two keep their own outputs (read by later
/// sums) and write the sum's ReLU as a second output, the last one's sum replaces its output.
/// Four steps; values are the naive loops', and every intermediate can be asked for by name.
#[test]
fn running_sums_of_a_dense_block_fold_into_its_convolutions() -> R {
    let (n, c, h, w) = (2, 4, 7, 6);
    let xv = values(n * c * h * w, 71);
    let (k0, b0) = (values(c * c * 9, 72), values(c, 73));
    let seps: Vec<[Vec<f32>; 4]> = (0..3u64)
        .map(|i| {
            [
                values(c * 9, 80 + 4 * i),
                values(c, 81 + 4 * i),
                values(c * c, 82 + 4 * i),
                values(c, 83 + 4 * i),
            ]
        })
        .collect();
    let pads = attr_ints("pads", &[1, 1, 1, 1]);
    let mut nodes = vec![
        node("Conv", "conv0", &["x", "w0", "b0"], &["c0"], vec![pads.clone()]),
        node("Relu", "r0", &["c0"], &["out1"], vec![]),
    ];
    let mut inits =
        vec![init_f32_raw("w0", &[c as i64, c as i64, 3, 3], &k0), init_f32("b0", &[c as i64], b0.clone())];
    for (i, (input, out)) in [("out1", "out2"), ("in3", "out3"), ("in4", "out4")].into_iter().enumerate() {
        let [kd, bd, kp, bp] = &seps[i];
        let names = [format!("wd{i}"), format!("bd{i}"), format!("wp{i}"), format!("bp{i}")];
        let (dw, d) = (format!("dw{i}"), format!("d{i}"));
        nodes.push(node(
            "Conv",
            &dw,
            &[input, &names[0], &names[1]],
            &[&d],
            vec![pads.clone(), attr_i("group", c as i64)],
        ));
        nodes.push(node("Conv", &format!("pw{i}"), &[&d, &names[2], &names[3]], &[out], vec![]));
        inits.push(init_f32_raw(&names[0], &[c as i64, 1, 3, 3], kd));
        inits.push(init_f32(&names[1], &[c as i64], bd.clone()));
        inits.push(init_f32_raw(&names[2], &[c as i64, c as i64, 1, 1], kp));
        inits.push(init_f32(&names[3], &[c as i64], bp.clone()));
        match i {
            0 => nodes.extend([
                node("Add", "s3", &["out1", "out2"], &["t3"], vec![]),
                node("Relu", "r3", &["t3"], &["in3"], vec![]),
            ]),
            1 => nodes.extend([
                node("Add", "s4a", &["out2", "out3"], &["t4a"], vec![]),
                node("Add", "s4", &["out1", "t4a"], &["t4"], vec![]),
                node("Relu", "r4", &["t4"], &["in4"], vec![]),
            ]),
            _ => nodes.extend([
                node("Add", "s5a", &["out3", "out4"], &["t5a"], vec![]),
                node("Add", "s5b", &["out2", "t5a"], &["t5b"], vec![]),
                node("Add", "s5", &["out1", "t5b"], &["t5"], vec![]),
                node("Relu", "r5", &["t5"], &["y"], vec![]),
            ]),
        }
    }
    let m = model(nodes, inits, &["x"], &["y"], 13);
    let g = OnnxGraph::from_model(&m, &Device::Cpu)?;
    assert_eq!(g.num_steps(), 4, "conv0+relu, then one separable convolution per running sum");

    let dims = [n, c, h, w];
    let relu = |v: &[f32]| v.iter().map(|v| v.max(0.0)).collect::<Vec<f32>>();
    let sum =
        |vs: &[&Vec<f32>]| (0..vs[0].len()).map(|i| vs.iter().map(|v| v[i]).sum()).collect::<Vec<f32>>();
    let sep = |x: &[f32], i: usize| {
        let [kd, bd, kp, bp] = &seps[i];
        let (d, _) = naive_conv(x, dims, kd, [c, 1, 3, 3], Some(bd), c, [1, 1], [1, 1], [1, 1, 1, 1]);
        naive_conv(&d, dims, kp, [c, c, 1, 1], Some(bp), 1, [1, 1], [1, 1], [0, 0, 0, 0]).0
    };
    let (c0, _) = naive_conv(&xv, dims, &k0, [c, c, 3, 3], Some(&b0), 1, [1, 1], [1, 1], [1, 1, 1, 1]);
    let out1 = relu(&c0);
    let out2 = sep(&out1, 0);
    let in3 = relu(&sum(&[&out1, &out2]));
    let out3 = sep(&in3, 1);
    let in4 = relu(&sum(&[&out1, &out2, &out3]));
    let out4 = sep(&in4, 2);
    let y = relu(&sum(&[&out1, &out2, &out3, &out4]));
    assert!(in3.contains(&0.0) && y.contains(&0.0), "the test needs negative sums");

    let x = Tensor::from_vec(xv, dims.to_vec(), &Device::Cpu)?;
    let names = ["y", "out2", "in3", "out3", "in4"];
    let got = g.run(&[("x", &x)], &names)?;
    for ((name, got), want) in names.iter().zip(&got).zip([&y, &out2, &in3, &out3, &in4]) {
        assert_eq!(got.dims(), &dims, "{name}");
        let d = max_diff(&got.flatten_all()?.to_vec1::<f32>()?, want);
        assert!(d < 1e-4, "{name}: max diff {d}");
    }
    // A running sum the fused plan no longer stores, through the unfused plan.
    let got = g.run(&[("x", &x)], &["t4"])?.remove(0).flatten_all()?.to_vec1::<f32>()?;
    assert!(max_diff(&got, &sum(&[&out1, &out2, &out3])) < 1e-4, "t4 by name");
    Ok(())
}

/// Chains of `Add`s whose intermediate sums nothing else reads are planned as one n-ary sum (with
/// the `Relu` after it, and broadcasting operands through candle); a sum read twice stays a step
/// of its own; values are those of the plain arithmetic, and removed sums can still be asked for.
#[test]
fn add_chains_fold_into_one_sum_without_changing_values() -> R {
    let dims = [2usize, 3, 4, 5];
    let n: usize = dims.iter().product();
    let xv = values(n, 41);
    let bias = values(3, 42);
    let scalars = [0.5f32, -1.25, 2.0, 0.75];
    let mut nodes = Vec::new();
    let mut inits = vec![init_f32("bias", &[1, 3, 1, 1], bias.clone())];
    for (i, name) in ["p", "q", "r", "s"].iter().enumerate() {
        let k = format!("k{i}");
        inits.push(init_f32(&k, &[1], vec![scalars[i]]));
        nodes.push(node("Mul", name, &["x", &k], &[name], vec![]));
    }
    nodes.extend([
        node("Add", "t1", &["r", "s"], &["t1"], vec![]),
        node("Add", "t2", &["q", "t1"], &["t2"], vec![]),
        node("Add", "t3", &["p", "t2"], &["t3"], vec![]),
        node("Relu", "y1", &["t3"], &["y1"], vec![]),
        node("Add", "u1", &["p", "bias"], &["u1"], vec![]),
        node("Add", "y2", &["u1", "q"], &["y2"], vec![]),
        node("Add", "v", &["p", "q"], &["v"], vec![]),
        node("Add", "y3", &["v", "r"], &["y3"], vec![]),
        node("Add", "y4", &["v", "s"], &["y4"], vec![]),
    ]);
    let m = model(nodes, inits, &["x"], &["y1", "y2", "y3", "y4"], 13);
    let g = OnnxGraph::from_model(&m, &Device::Cpu)?;
    assert_eq!(g.num_steps(), 4 + 1 + 1 + 3, "t1..t3 + Relu and u1 + y2 fold; v has two readers");

    let term = |i: usize| xv.iter().map(|v| v * scalars[i]).collect::<Vec<f32>>();
    let (p, q, r, s) = (term(0), term(1), term(2), term(3));
    let at = |i: usize| (i / (dims[2] * dims[3])) % dims[1];
    let want = [
        (0..n).map(|i| (p[i] + q[i] + r[i] + s[i]).max(0.0)).collect::<Vec<f32>>(),
        (0..n).map(|i| p[i] + bias[at(i)] + q[i]).collect(),
        (0..n).map(|i| p[i] + q[i] + r[i]).collect(),
        (0..n).map(|i| p[i] + q[i] + s[i]).collect(),
    ];
    assert!(want[0].contains(&0.0), "the test needs negative sums");
    let x = Tensor::from_vec(xv.clone(), dims.to_vec(), &Device::Cpu)?;
    let got = g.run(&[("x", &x)], &["y1", "y2", "y3", "y4"])?;
    for (k, (got, want)) in got.iter().zip(&want).enumerate() {
        let d = max_diff(&got.flatten_all()?.to_vec1::<f32>()?, want);
        assert!(d < 1e-5, "y{} max diff {d}", k + 1);
    }
    // An intermediate sum the fusion removed is still a value of the graph.
    let t2 = g.run(&[("x", &x)], &["t2"])?.remove(0).flatten_all()?.to_vec1::<f32>()?;
    let d = max_diff(&t2, &(0..n).map(|i| q[i] + r[i] + s[i]).collect::<Vec<f32>>());
    assert!(d < 1e-5, "t2 max diff {d}");
    Ok(())
}

/// An input normalisation `(x − mean)·scale` before a convolution with asymmetric pads (face-api's
/// first layer), and `(k·x)/d` before one with symmetric pads: planning folds the elementwise
/// nodes into the convolution (one step), which pads after them as the graph does (zeros of the
/// normalised input), with the same values as the unfused plan, bit for bit, and as the naive
/// loops. Nodes that do not fit (a constant on the left of `Sub`, a constant of another shape)
/// stay and keep their values.
#[test]
fn per_channel_input_ops_fold_into_the_convolution_after_them() -> R {
    let (n, c, co, h, w) = (2, 3, 5, 9, 8);
    let xv: Vec<f32> = values(n * c * h * w, 61).iter().map(|v| 127.5 * (v + 1.0)).collect();
    let (kv, bv) = (values(co * c * 9, 62), values(co, 63));
    let mean = [122.782f32, 117.001, 104.298];
    let x = Tensor::from_vec(xv.clone(), vec![n, c, h, w], &Device::Cpu)?;
    let conv = |input: &str, pads: [i64; 4], stride: i64| {
        node(
            "Conv",
            "conv",
            &[input, "w", "b"],
            &["y0"],
            vec![attr_ints("pads", &pads), attr_ints("strides", &[stride, stride])],
        )
    };
    let inits = |extra: Vec<TensorProto>| {
        let mut v = vec![
            init_f32_raw("w", &[co as i64, c as i64, 3, 3], &kv),
            init_f32("b", &[co as i64], bv.clone()),
        ];
        v.extend(extra);
        v
    };
    // (nodes, constants, steps after planning, the normalised input the naive loops see, pads, stride)
    type Case = (Vec<NodeProto>, Vec<TensorProto>, usize, Vec<f32>, [usize; 4], usize);
    let per_channel = |f: &dyn Fn(f32, usize) -> f32| -> Vec<f32> {
        xv.iter().enumerate().map(|(i, &v)| f(v, (i / (h * w)) % c)).collect()
    };
    let cases: Vec<Case> = vec![
        (
            vec![
                node("Sub", "sub", &["x", "mean"], &["s"], vec![]),
                node("Mul", "mul", &["s", "inv"], &["m"], vec![]),
                conv("m", [0, 0, 1, 1], 2),
                node("Relu", "relu", &["y0"], &["y"], vec![]),
            ],
            inits(vec![
                init_f32("mean", &[1, c as i64, 1, 1], mean.to_vec()),
                init_f32("inv", &[1], vec![1.0 / 255.0]),
            ]),
            1,
            per_channel(&|v, ch| (v - mean[ch]) * (1.0 / 255.0)),
            [0, 0, 1, 1],
            2,
        ),
        (
            vec![
                node("Mul", "mul", &["k", "x"], &["s"], vec![]),
                node("Div", "div", &["s", "d"], &["m"], vec![]),
                conv("m", [1, 1, 1, 1], 1),
                node("Relu", "relu", &["y0"], &["y"], vec![]),
            ],
            inits(vec![
                init_f32("k", &[], vec![0.5]),
                init_f32("d", &[c as i64, 1, 1], vec![3.0, 7.0, 11.0]),
            ]),
            1,
            per_channel(&|v, ch| (0.5 * v) / [3.0f32, 7.0, 11.0][ch]),
            [1, 1, 1, 1],
            1,
        ),
        (
            // `mean − x` does not fold (the constant is on the left of a Sub); the Mul after it does.
            vec![
                node("Sub", "sub", &["mean", "x"], &["s"], vec![]),
                node("Mul", "mul", &["s", "inv"], &["m"], vec![]),
                conv("m", [1, 0, 0, 1], 1),
                node("Relu", "relu", &["y0"], &["y"], vec![]),
            ],
            inits(vec![
                init_f32("mean", &[1, c as i64, 1, 1], mean.to_vec()),
                init_f32("inv", &[1], vec![0.01]),
            ]),
            2,
            per_channel(&|v, ch| (mean[ch] - v) * 0.01),
            [1, 0, 0, 1],
            1,
        ),
        (
            // A constant per column, not per channel: stays a node of its own.
            vec![
                node("Add", "add", &["x", "cols"], &["m"], vec![]),
                conv("m", [1, 1, 1, 1], 2),
                node("Relu", "relu", &["y0"], &["y"], vec![]),
            ],
            inits(vec![init_f32("cols", &[1, 1, 1, w as i64], (0..w).map(|i| i as f32).collect())]),
            2,
            xv.iter().enumerate().map(|(i, &v)| v + (i % w) as f32).collect(),
            [1, 1, 1, 1],
            2,
        ),
    ];
    for (case, (nodes, consts, steps, normalised, pads, stride)) in cases.into_iter().enumerate() {
        let m = model(nodes, consts, &["x"], &["y"], 13);
        let g = OnnxGraph::from_model(&m, &Device::Cpu)?;
        assert_eq!(g.num_steps(), steps, "case {case}: steps after planning");
        let fused = g.run(&[("x", &x)], &["y"])?.remove(0);
        // Asking for the normalised input runs the unfused plan.
        let unfused = g.run(&[("x", &x)], &["m", "y"])?;
        let got_m = unfused[0].flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got_m, normalised, "case {case}: the normalised input by name");
        let (want, dims) = naive_conv(
            &normalised,
            [n, c, h, w],
            &kv,
            [co, c, 3, 3],
            Some(&bv),
            1,
            [stride, stride],
            [1, 1],
            pads,
        );
        let want: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
        assert_eq!(fused.dims(), &dims, "case {case}");
        let fused = fused.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(
            fused,
            unfused[1].flatten_all()?.to_vec1::<f32>()?,
            "case {case}: fused and unfused plans differ"
        );
        // Relative to the outputs' size (the un-normalised input of the last case gives hundreds).
        let tol = 1e-6 * want.iter().fold(100f32, |m, v| m.max(v.abs()));
        let d = max_diff(&fused, &want);
        assert!(d < tol, "case {case}: max diff {d} from the naive loops");
        // A strided input (not contiguous) takes the broadcast ops instead of the one-pass copy.
        let wide = Tensor::cat(&[&x, &x], 3)?.narrow(3, 0, w)?;
        assert!(!wide.is_contiguous());
        let strided = g.run(&[("x", &wide)], &["y"])?.remove(0).flatten_all()?.to_vec1::<f32>()?;
        let d = max_diff(&strided, &want);
        assert!(d < tol, "case {case}: strided input max diff {d}");
    }
    // A constant of rank 5 (even a single value) broadcasts the input to rank 5, which a 2-D
    // convolution rejects: it is not folded, and the run fails as the graph says.
    let m = model(
        vec![node("Mul", "mul", &["x", "k5"], &["m"], vec![]), conv("m", [1, 1, 1, 1], 1)],
        inits(vec![init_f32("k5", &[1, 1, 1, 1, 1], vec![2.0])]),
        &["x"],
        &["y0"],
        13,
    );
    let g = OnnxGraph::from_model(&m, &Device::Cpu)?;
    assert_eq!(g.num_steps(), 2, "a rank-5 constant folded");
    let e = g.run(&[("x", &x)], &["y0"]).unwrap_err().to_string();
    assert!(e.contains("conv") && e.contains("rank 5"), "{e}");
    Ok(())
}
