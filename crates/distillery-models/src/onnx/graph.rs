//! An ONNX graph turned into an execution plan, and its evaluation.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_onnx::onnx::{ModelProto, NodeProto};
use prost::Message;

use super::OnnxError;
use super::kernels::{HostConv, InputOps, Separable};
use super::ops::{BinOp, Op, ParseError, UnaryOp};
use super::proto::tensor_from_proto;

/// One node of the plan. Inputs and outputs are value slots; `None` marks an omitted optional.
#[derive(Clone, Debug)]
struct Step {
    name: String,
    op_type: String,
    op: Op,
    inputs: Vec<Option<usize>>,
    outputs: Vec<Option<usize>>,
}

/// A parsed ONNX model ready to run: nodes topologically ordered, constants as tensors on the
/// device, and every node whose inputs are all constants already evaluated.
#[derive(Debug)]
pub struct OnnxGraph {
    device: Device,
    opset: i64,
    /// Value name → slot.
    slots: HashMap<String, usize>,
    /// Per slot: the constant tensor (initializers and folded values), if any.
    constants: Vec<Option<Tensor>>,
    /// Per slot: index of the step that produces it, if any.
    producer: Vec<Option<usize>>,
    /// Runtime inputs (graph inputs that are not initializers), by name.
    inputs: Vec<(String, usize)>,
    /// Names of the graph's declared outputs.
    outputs: Vec<String>,
    steps: Vec<Step>,
    /// The plan before [`OnnxGraph::fuse`] (steps and producers), kept when fusion removed values
    /// a caller may still ask for by name.
    exact: Option<(Vec<Step>, Vec<Option<usize>>)>,
}

impl OnnxGraph {
    /// Reads and plans the model at `path`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, OnnxError> {
        let bytes =
            std::fs::read(path).map_err(|source| OnnxError::Io { path: path.to_path_buf(), source })?;
        Self::from_bytes(&bytes, device).map_err(|e| match e {
            OnnxError::Decode { reason, .. } => OnnxError::Decode { path: path.to_path_buf(), reason },
            other => other,
        })
    }

    /// Decodes and plans a serialised `ModelProto`.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self, OnnxError> {
        let model = ModelProto::decode(bytes)
            .map_err(|e| OnnxError::Decode { path: "<memory>".into(), reason: e.to_string() })?;
        Self::from_model(&model, device)
    }

    /// Plans an in-memory model.
    pub fn from_model(model: &ModelProto, device: &Device) -> Result<Self, OnnxError> {
        let graph = model.graph.as_ref().ok_or_else(|| OnnxError::Graph("the model has no graph".into()))?;
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(1, |o| o.version);
        let mut g = OnnxGraph {
            device: device.clone(),
            opset,
            slots: HashMap::new(),
            constants: Vec::new(),
            producer: Vec::new(),
            inputs: Vec::new(),
            outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
            steps: Vec::new(),
            exact: None,
        };
        for init in &graph.initializer {
            let t = tensor_from_proto(init, device).map_err(OnnxError::Graph)?;
            let s = g.slot(&init.name);
            g.constants[s] = Some(t);
        }
        for inp in &graph.input {
            let s = g.slot(&inp.name);
            if g.constants[s].is_none() {
                g.inputs.push((inp.name.clone(), s));
            }
        }
        for node in order(&graph.node, &g)? {
            g.add_node(node)?;
        }
        for o in &g.outputs {
            if !g.slots.contains_key(o) {
                return Err(OnnxError::Graph(format!("graph output `{o}` is produced by no node")));
            }
        }
        g.fuse()?;
        Ok(g)
    }

    /// Plans for speed: the constant weights of every convolution are flattened on the host once;
    /// `Add`/`Sub`/`Mul`/`Div` nodes with a per-channel constant whose result only a convolution
    /// reads are folded into its input (one pass with its padding); a `Relu` whose input nothing
    /// else reads is folded into the `Conv` or `Add` producing it (one pass over the data instead
    /// of two, one tensor fewer); then a depthwise `Conv` whose output only a 1×1 `Conv` reads is
    /// folded into it (its output is never stored); then chains of `Add`s become n-ary sums, and
    /// each sum is folded into the convolution producing one of its operands. The unfused plan is
    /// kept for runs that ask for a value fusion removed.
    fn fuse(&mut self) -> Result<(), OnnxError> {
        for st in &mut self.steps {
            let Op::Conv(_, extras) = &mut st.op else { continue };
            let constant = |i: usize| st.inputs.get(i).copied().flatten().map(|s| self.constants[s].as_ref());
            let (w, b) = match (constant(1), constant(2)) {
                (Some(Some(w)), None) => (w, None),
                (Some(Some(w)), Some(Some(b))) => (w, Some(b)),
                _ => continue,
            };
            extras.host = HostConv::new(w, b).map_err(|source| OnnxError::Node {
                op_type: st.op_type.clone(),
                node: st.name.clone(),
                source: Box::new(source),
            })?;
        }
        let before = (self.steps.clone(), self.producer.clone());
        let inputs = self.fold_input_ops();
        let relus = self.fold_relus();
        let separables = self.fold_separables();
        let chains = self.fold_add_chains();
        let sums = self.fold_sums();
        if inputs + relus + separables + chains + sums > 0 {
            self.exact = Some(before);
        }
        Ok(())
    }

    /// Slots read by exactly one step and not declared outputs: their producer may be fused
    /// into that reader.
    fn single_reader_slots(&self) -> Vec<bool> {
        let mut uses = vec![0usize; self.constants.len()];
        for st in &self.steps {
            st.inputs.iter().flatten().for_each(|&s| uses[s] += 1);
        }
        for o in &self.outputs {
            if let Some(&s) = self.slots.get(o) {
                uses[s] += 1;
            }
        }
        uses.into_iter().map(|u| u == 1).collect()
    }

    /// Folds the chain of `Add`, `Sub`, `Mul` and `Div` nodes with a constant per channel (or one
    /// constant) that leads into a 2-D `Conv`, each node's result read by the next alone, into
    /// that convolution's input ([`InputOps`]): an input normalisation such as
    /// `(x − mean)·scale` then costs one pass with the padding instead of a pass per node.
    /// Constants must be the second operand of `Sub` and `Div`. Returns how many nodes folded.
    fn fold_input_ops(&mut self) -> usize {
        let single = self.single_reader_slots();
        let constant = |s: usize| self.constants[s].as_ref();
        let mut folds = Vec::new();
        for (i, st) in self.steps.iter().enumerate() {
            let Op::Conv(attrs, _) = &st.op else { continue };
            let (Some(Some(x)), Some(w)) = (st.inputs.first().copied(), st.inputs.get(1).copied().flatten())
            else {
                continue;
            };
            let Some(w) = constant(w).filter(|w| w.rank() == 4) else { continue };
            // Back from the convolution's input: (node, data input, op, constant), nearest first.
            let mut chain = Vec::new();
            let mut slot = x;
            while let Some(p) = self.producer[slot] {
                let node = &self.steps[p];
                let Op::Binary(op) = node.op else { break };
                if !single[slot] || node.outputs.len() != 1 || node.inputs.len() != 2 {
                    break;
                }
                let (Some(a), Some(b)) = (node.inputs[0], node.inputs[1]) else { break };
                let commutes = matches!(op, BinOp::Add | BinOp::Mul);
                let (data, k) = match (constant(a), constant(b)) {
                    (None, Some(k)) => (a, k),
                    (Some(k), None) if commutes => (b, k),
                    _ => break,
                };
                chain.push((p, data, op, k.clone()));
                slot = data;
            }
            // The longest run next to the convolution whose constants fit.
            while !chain.is_empty() {
                let steps: Vec<(BinOp, Tensor)> =
                    chain.iter().rev().map(|(_, _, op, k)| (*op, k.clone())).collect();
                if let Some(ops) = InputOps::try_new(&steps, attrs, w) {
                    folds.push((
                        i,
                        chain.last().expect("not empty").1,
                        ops,
                        chain.iter().map(|c| c.0).collect::<Vec<_>>(),
                    ));
                    break;
                }
                chain.pop();
            }
        }
        let mut removed = vec![false; self.steps.len()];
        for (i, data, ops, nodes) in folds {
            let names: Vec<String> = nodes.iter().rev().map(|&p| self.steps[p].op_type.clone()).collect();
            nodes.iter().for_each(|&p| removed[p] = true);
            let st = &mut self.steps[i];
            let Op::Conv(_, extras) = &mut st.op else { unreachable!("a Conv step") };
            extras.input = Some(ops);
            st.inputs[0] = Some(data);
            st.op_type = format!("{}>{}", names.join(">"), st.op_type);
        }
        self.drop_steps(&removed)
    }

    /// Folds each `Relu` into the `Conv` or `Add` whose output only it reads; returns how many.
    fn fold_relus(&mut self) -> usize {
        let single = self.single_reader_slots();
        // (Relu step, producer step) pairs; a producer has one reader, so it appears once.
        let pairs: Vec<(usize, usize)> = self
            .steps
            .iter()
            .enumerate()
            .filter(|(_, st)| matches!(st.op, Op::Unary(UnaryOp::Relu)))
            .filter_map(|(i, st)| {
                let s = st.inputs.first().copied().flatten()?;
                let p = self.producer[s]?;
                let producer = &self.steps[p];
                let fusable = match &producer.op {
                    Op::Conv(_, extras) => !extras.relu,
                    Op::Binary(BinOp::Add) => true,
                    _ => false,
                };
                (fusable && single[s] && producer.outputs.len() == 1).then_some((i, p))
            })
            .collect();
        let mut removed = vec![false; self.steps.len()];
        for (i, p) in pairs {
            let outputs = self.steps[i].outputs.clone();
            let producer = &mut self.steps[p];
            match &mut producer.op {
                Op::Conv(_, extras) => extras.relu = true,
                op => *op = Op::AddN { relu: true },
            }
            producer.op_type.push_str("+Relu");
            producer.outputs = outputs;
            removed[i] = true;
        }
        self.drop_steps(&removed)
    }

    /// Folds each depthwise `Conv` into the 1×1 `Conv` that is the only reader of its output;
    /// returns how many.
    fn fold_separables(&mut self) -> usize {
        let single = self.single_reader_slots();
        let constant =
            |st: &Step, i: usize| st.inputs.get(i).copied().flatten().and_then(|s| self.constants[s].clone());
        let mut fused = Vec::new();
        for (i, st) in self.steps.iter().enumerate() {
            let Op::Conv(pa, pe) = &st.op else { continue };
            let Some(Some(x)) = st.inputs.first().copied() else { continue };
            let Some(p) = self.producer[x] else { continue };
            let dst = &self.steps[p];
            let Op::Conv(da, de) = &dst.op else { continue };
            if !single[x]
                || dst.outputs.len() != 1
                || (dst.inputs.len() > 2 && dst.inputs[2].is_some() && constant(dst, 2).is_none())
            {
                continue;
            }
            let (Some(dw_w), Some(pw_w)) = (constant(dst, 1), constant(st, 1)) else { continue };
            let dw_b = constant(dst, 2);
            if let Some(sep) = Separable::try_new((da, &dw_w, dw_b.as_ref(), de), (pa, &pw_w, pe)) {
                fused.push((i, p, sep));
            }
        }
        let mut removed = vec![false; self.steps.len()];
        for (i, p, sep) in fused {
            let dw_input = self.steps[p].inputs[0];
            let dw_type = self.steps[p].op_type.clone();
            let st = &mut self.steps[i];
            st.op = Op::Separable(Box::new(sep));
            st.inputs[0] = dw_input;
            st.op_type = format!("{dw_type}>{}", st.op_type);
            removed[p] = true;
        }
        self.drop_steps(&removed)
    }

    /// Folds each sum (`Add`, `Add+Relu`, or an n-ary sum from [`Self::fold_add_chains`]) into the
    /// convolution producing one of its operands, when that convolution has no ReLU or sum of its
    /// own and the other operands are ready before it runs: it then adds them to each output tile
    /// while the tile is in cache (no separate pass over the operands). When only the sum reads
    /// the convolution's output, the sum replaces that output; otherwise the convolution keeps it
    /// and writes the sum as a second output (the running sums of a dense block). Returns how
    /// many sums were folded.
    fn fold_sums(&mut self) -> usize {
        let single = self.single_reader_slots();
        let mut removed = vec![false; self.steps.len()];
        for i in 0..self.steps.len() {
            let relu = match self.steps[i].op {
                Op::Binary(BinOp::Add) => false,
                Op::AddN { relu } => relu,
                _ => continue,
            };
            let Some(operands) = self.steps[i].inputs.iter().copied().collect::<Option<Vec<usize>>>() else {
                continue;
            };
            // The latest-produced operand first: the others are then more likely computed already.
            let mut order: Vec<usize> = (0..operands.len()).collect();
            order.sort_by_key(|&k| std::cmp::Reverse(self.producer[operands[k]]));
            for k in order {
                let conv_out = operands[k];
                let Some(p) = self.producer[conv_out] else { continue };
                let others: Vec<usize> =
                    operands.iter().enumerate().filter(|&(j, _)| j != k).map(|(_, &o)| o).collect();
                let ready = others.iter().all(|&o| self.producer[o].is_none_or(|q| q < p));
                let st = &self.steps[p];
                let fusable = match &st.op {
                    Op::Conv(_, extras) => !extras.relu,
                    Op::Separable(sep) => !sep.relu(),
                    _ => false,
                };
                if !fusable || !ready || removed[p] || st.outputs.len() != 1 || st.inputs.len() > 3 {
                    continue;
                }
                let keep_own = !single[conv_out];
                let outputs = self.steps[i].outputs.clone();
                let sum_type = match others.len() {
                    1 => "Add".to_owned(),
                    n => format!("Sum{}", n + 1),
                };
                let st = &mut self.steps[p];
                match &mut st.op {
                    Op::Conv(_, extras) => {
                        extras.relu = relu;
                        extras.keep_own = keep_own;
                    }
                    Op::Separable(sep) => sep.fuse_sum(relu, keep_own),
                    _ => unreachable!("checked fusable above"),
                }
                st.inputs.resize(3, None);
                st.inputs.extend(others.into_iter().map(Some));
                // `+` when the sum replaces the output, `,` when it is a second output.
                st.op_type = format!(
                    "{}{}{sum_type}{}",
                    st.op_type,
                    if keep_own { "," } else { "+" },
                    if relu { "+Relu" } else { "" }
                );
                if keep_own {
                    st.outputs.extend(outputs);
                } else {
                    st.outputs = outputs;
                }
                removed[i] = true;
                break;
            }
        }
        self.drop_steps(&removed)
    }

    /// Merges each plain `Add` whose sum only another addition reads into that addition: a chain
    /// such as `relu(a + (b + (c + d)))` becomes one n-ary sum of `a, b, c, d` (one pass over the
    /// operands instead of one per `Add`; the additions may run in another order). Returns how
    /// many `Add`s were merged away.
    fn fold_add_chains(&mut self) -> usize {
        let single = self.single_reader_slots();
        let mut removed = vec![false; self.steps.len()];
        for i in 0..self.steps.len() {
            let relu = match self.steps[i].op {
                Op::Binary(BinOp::Add) => false,
                Op::AddN { relu } => relu,
                _ => continue,
            };
            let mut inputs = Vec::with_capacity(self.steps[i].inputs.len() + 2);
            let mut merged = false;
            for &s in &self.steps[i].inputs {
                let Some(s) = s else {
                    inputs.push(None);
                    continue;
                };
                let inner = self.producer[s].filter(|&p| {
                    let st = &self.steps[p];
                    single[s]
                        && !removed[p]
                        && st.outputs.len() == 1
                        && st.inputs.iter().all(Option::is_some)
                        && matches!(st.op, Op::Binary(BinOp::Add) | Op::AddN { relu: false })
                });
                match inner {
                    Some(p) => {
                        inputs.extend(self.steps[p].inputs.iter().copied());
                        removed[p] = true;
                        merged = true;
                    }
                    None => inputs.push(Some(s)),
                }
            }
            if merged {
                let st = &mut self.steps[i];
                st.op = Op::AddN { relu };
                st.inputs = inputs;
                st.op_type = format!("Sum{}{}", st.inputs.len(), if relu { "+Relu" } else { "" });
            }
        }
        self.drop_steps(&removed)
    }

    /// Removes the marked steps and recomputes which step produces each slot; returns how many.
    fn drop_steps(&mut self, removed: &[bool]) -> usize {
        let count = removed.iter().filter(|r| **r).count();
        if count == 0 {
            return 0;
        }
        let mut i = 0;
        self.steps.retain(|_| {
            i += 1;
            !removed[i - 1]
        });
        self.producer.iter_mut().for_each(|p| *p = None);
        for (idx, st) in self.steps.iter().enumerate() {
            for o in st.outputs.iter().flatten() {
                self.producer[*o] = Some(idx);
            }
        }
        count
    }

    fn slot(&mut self, name: &str) -> usize {
        if let Some(&s) = self.slots.get(name) {
            return s;
        }
        let s = self.constants.len();
        self.slots.insert(name.to_string(), s);
        self.constants.push(None);
        self.producer.push(None);
        s
    }

    fn add_node(&mut self, node: &NodeProto) -> Result<(), OnnxError> {
        let op = Op::parse(node, self.opset, &self.device).map_err(|e| match e {
            ParseError::Unsupported => OnnxError::UnsupportedOp {
                op_type: node.op_type.clone(),
                domain: if node.domain.is_empty() { "ai.onnx".into() } else { node.domain.clone() },
                node: node.name.clone(),
            },
            ParseError::Bad(reason) => {
                OnnxError::BadNode { op_type: node.op_type.clone(), node: node.name.clone(), reason }
            }
        })?;
        let inputs: Vec<Option<usize>> =
            node.input.iter().map(|n| if n.is_empty() { None } else { Some(self.slot(n)) }).collect();
        let outputs: Vec<Option<usize>> =
            node.output.iter().map(|n| if n.is_empty() { None } else { Some(self.slot(n)) }).collect();
        let step = Step { name: node.name.clone(), op_type: node.op_type.clone(), op, inputs, outputs };
        // Fold nodes whose inputs are all constants: they cost nothing per batch afterwards.
        if step.inputs.iter().flatten().all(|&s| self.constants[s].is_some()) {
            let args: Vec<Option<&Tensor>> =
                step.inputs.iter().map(|s| s.and_then(|s| self.constants[s].as_ref())).collect();
            let ys = step.op.exec(&args).map_err(|source| OnnxError::Node {
                op_type: step.op_type.clone(),
                node: step.name.clone(),
                source: Box::new(source),
            })?;
            for (o, y) in step.outputs.iter().zip(ys) {
                if let Some(o) = o {
                    self.constants[*o] = Some(y);
                }
            }
            return Ok(());
        }
        let idx = self.steps.len();
        for o in step.outputs.iter().flatten() {
            self.producer[*o] = Some(idx);
        }
        self.steps.push(step);
        Ok(())
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The default-domain opset the model declares.
    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// Names of the inputs a run must supply.
    pub fn input_names(&self) -> Vec<&str> {
        self.inputs.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Names of the graph's declared outputs.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Number of nodes left to run per batch (after constant folding).
    pub fn num_steps(&self) -> usize {
        self.steps.len()
    }

    /// Whether `name` is a value of the graph (input, initializer or node output).
    pub fn has_value(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    /// Evaluates the graph: `inputs` by name, returning the values named in `outputs` (declared
    /// outputs or any intermediate value), in that order. Only the nodes those outputs need run.
    pub fn run(&self, inputs: &[(&str, &Tensor)], outputs: &[&str]) -> Result<Vec<Tensor>, OnnxError> {
        // On a rayon worker: each node's parallel loop then runs without a hand-off to the pool.
        crate::nn::on_pool(|| self.run_timed(inputs, outputs, None))
    }

    /// [`OnnxGraph::run`], also returning the wall time of every node that ran, in order (for
    /// profiling: [`by_op_type`] sums them up).
    pub fn run_profiled(
        &self,
        inputs: &[(&str, &Tensor)],
        outputs: &[&str],
    ) -> Result<(Vec<Tensor>, Vec<NodeTime>), OnnxError> {
        // On the pool like `run`, so the times are those of a real run.
        crate::nn::on_pool(|| {
            let mut times = Vec::with_capacity(self.steps.len());
            let ys = self.run_timed(inputs, outputs, Some(&mut times))?;
            Ok((ys, times))
        })
    }

    fn run_timed(
        &self,
        inputs: &[(&str, &Tensor)],
        outputs: &[&str],
        mut times: Option<&mut Vec<NodeTime>>,
    ) -> Result<Vec<Tensor>, OnnxError> {
        let mut values: Vec<Option<Tensor>> = self.constants.clone();
        for (name, t) in inputs {
            let Some(&(_, s)) = self.inputs.iter().find(|(n, _)| n == name) else {
                return Err(OnnxError::Graph(format!(
                    "`{name}` is not an input of the graph (inputs: {:?})",
                    self.input_names()
                )));
            };
            values[s] = Some(t.to_device(&self.device)?);
        }
        let mut wanted = Vec::with_capacity(outputs.len());
        for o in outputs {
            let s = *self
                .slots
                .get(*o)
                .ok_or_else(|| OnnxError::Graph(format!("`{o}` is not a value of the graph")))?;
            wanted.push(s);
        }
        // The fused plan, unless a wanted value exists only in the exact one.
        let (steps, producer) = match &self.exact {
            Some((steps, producer))
                if wanted.iter().any(|&s| self.producer[s].is_none() && producer[s].is_some()) =>
            {
                (steps, producer)
            }
            _ => (&self.steps, &self.producer),
        };
        // Steps needed for the wanted values, found walking producers backwards.
        let mut needed = vec![false; steps.len()];
        let mut stack: Vec<usize> = wanted.iter().filter_map(|&s| producer[s]).collect();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut needed[i], true) {
                continue;
            }
            stack.extend(steps[i].inputs.iter().flatten().filter_map(|&s| producer[s]));
        }
        // Remaining uses per slot, so intermediates are dropped as soon as possible.
        let mut uses = vec![0usize; values.len()];
        for (i, st) in steps.iter().enumerate() {
            if needed[i] {
                st.inputs.iter().flatten().for_each(|&s| uses[s] += 1);
            }
        }
        wanted.iter().for_each(|&s| uses[s] += 1);
        for (i, st) in steps.iter().enumerate() {
            if !needed[i] {
                continue;
            }
            let mut args = Vec::with_capacity(st.inputs.len());
            for inp in &st.inputs {
                match inp {
                    None => args.push(None),
                    Some(s) => match &values[*s] {
                        Some(t) => args.push(Some(t)),
                        None => {
                            let name =
                                self.slots.iter().find(|(_, v)| **v == *s).map_or("?", |(k, _)| k.as_str());
                            return Err(OnnxError::BadNode {
                                op_type: st.op_type.clone(),
                                node: st.name.clone(),
                                reason: format!("input `{name}` was not provided"),
                            });
                        }
                    },
                }
            }
            let start = times.is_some().then(std::time::Instant::now);
            let ys = st.op.exec(&args).map_err(|source| OnnxError::Node {
                op_type: st.op_type.clone(),
                node: st.name.clone(),
                source: Box::new(source),
            })?;
            if let (Some(times), Some(start)) = (times.as_deref_mut(), start) {
                let shape = ys.first().map(|y| y.dims().to_vec()).unwrap_or_default();
                times.push(NodeTime {
                    node: st.name.clone(),
                    op_type: st.op_type.clone(),
                    output_shape: shape,
                    elapsed: start.elapsed(),
                });
            }
            drop(args);
            for s in st.inputs.iter().flatten() {
                uses[*s] -= 1;
                if uses[*s] == 0 && self.constants[*s].is_none() {
                    values[*s] = None;
                }
            }
            for (o, y) in st.outputs.iter().zip(ys) {
                if let Some(o) = o {
                    values[*o] = Some(y);
                }
            }
        }
        wanted
            .iter()
            .zip(outputs)
            .map(|(&s, name)| {
                values[s].clone().ok_or_else(|| OnnxError::Graph(format!("value `{name}` was not computed")))
            })
            .collect()
    }
}

/// How long one node took in [`OnnxGraph::run_profiled`].
#[derive(Clone, Debug)]
pub struct NodeTime {
    pub node: String,
    pub op_type: String,
    /// Shape of the node's first output.
    pub output_shape: Vec<usize>,
    pub elapsed: std::time::Duration,
}

/// Per op type: total time and number of nodes, slowest first.
pub fn by_op_type(times: &[NodeTime]) -> Vec<(String, std::time::Duration, usize)> {
    let mut sums: Vec<(String, std::time::Duration, usize)> = Vec::new();
    for t in times {
        match sums.iter_mut().find(|(op, _, _)| *op == t.op_type) {
            Some((_, d, n)) => {
                *d += t.elapsed;
                *n += 1;
            }
            None => sums.push((t.op_type.clone(), t.elapsed, 1)),
        }
    }
    sums.sort_by_key(|s| std::cmp::Reverse(s.1));
    sums
}

/// The nodes in an order where every input is available before use (Kahn's algorithm, stable
/// for graphs already in order).
fn order<'a>(nodes: &'a [NodeProto], g: &OnnxGraph) -> Result<Vec<&'a NodeProto>, OnnxError> {
    let mut available: std::collections::HashSet<&str> = g.slots.keys().map(String::as_str).collect();
    let mut done = vec![false; nodes.len()];
    let mut out = Vec::with_capacity(nodes.len());
    loop {
        let mut progressed = false;
        for (i, n) in nodes.iter().enumerate() {
            if done[i] || !n.input.iter().all(|x| x.is_empty() || available.contains(x.as_str())) {
                continue;
            }
            done[i] = true;
            progressed = true;
            out.push(n);
            available.extend(n.output.iter().filter(|o| !o.is_empty()).map(String::as_str));
        }
        if out.len() == nodes.len() {
            return Ok(out);
        }
        if !progressed {
            let (i, n) = nodes.iter().enumerate().find(|(i, _)| !done[*i]).expect("a pending node");
            let missing = n.input.iter().find(|x| !x.is_empty() && !available.contains(x.as_str()));
            return Err(OnnxError::Graph(format!(
                "node `{}` ({}, #{i}) needs `{}`, which no initializer, input or node provides (or a cycle)",
                n.name,
                n.op_type,
                missing.map_or("?", |s| s.as_str())
            )));
        }
    }
}
