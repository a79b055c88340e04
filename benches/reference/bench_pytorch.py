#!/usr/bin/env python3
"""The reference side of Distillery's CPU benchmarks: the same workloads in PyTorch and onnxruntime.

Workloads (each printed as one JSON line, the same names as `./dev bench` prints):
  emonet_forward      EmoNet-8 forward images/s at batch 1 and 8 (our PyTorch definition of the
                      published network, from crates/distillery-models/tests/fixtures/emonet_parity.py)
  mobilenetv2_train   torchvision MobileNetV2 1.0x training images/s (forward, backward, AdamW step)
                      at 112x112 batch 32 and 224x224 batch 16, after warm-up steps
  faceapi_onnx        the face-api expression teacher in onnxruntime, images/s at batch 1 and 32

Device: $DEVICE (default cpu; `cuda` on a GPU machine, as benches/gpu.sh runs it). Sizes follow
the Rust benches' variables: EMONET_BENCH_BATCHES (default 1,8), STUDENT_BENCH_SHAPES (default
112x32,224x16), EMONET_BENCH_ITERS, STUDENT_BENCH_STEPS; EMONET_BENCH_DTYPE=bf16 (or f16) runs
EmoNet in half precision. BENCHES (default all three, comma-separated) picks workloads.

Threads: torch.set_num_threads and onnxruntime's intra-op threads are set to $THREADS (default:
the CPU count), which `./dev bench` matches with RAYON_NUM_THREADS. Run by hand where PyTorch is
installed; never part of the tests:

  python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch torchvision onnxruntime numpy
  THREADS=2 /tmp/ref/bin/python benches/reference/bench_pytorch.py
"""

import importlib.util
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
THREADS = int(os.environ.get("THREADS", os.cpu_count() or 1))
torch.set_num_threads(THREADS)
DEVICE = torch.device(os.environ.get("DEVICE", "cpu"))


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def emit(**row):
    row["threads"] = THREADS
    row["device"] = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    row["runtime"] = row.get("runtime", f"pytorch {torch.__version__}")
    print(json.dumps(row), flush=True)


def emonet_batches():
    return [int(b) for b in os.environ.get("EMONET_BENCH_BATCHES", "1,8").split(",")]


def student_shapes():
    shapes = os.environ.get("STUDENT_BENCH_SHAPES", "112x32,224x16").split(",")
    return [tuple(int(v) for v in s.strip().split("x")) for s in shapes]


def load_emonet_module():
    path = ROOT / "crates/distillery-models/tests/fixtures/emonet_parity.py"
    spec = importlib.util.spec_from_file_location("emonet_parity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def emonet_forward(iters):
    mod = load_emonet_module()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(os.environ.get("EMONET_BENCH_DTYPE"), torch.float32)
    model = mod.EmoNet(n_expression=8).eval().to(DEVICE, dtype)
    for batch in emonet_batches():
        x = torch.rand(batch, 3, 256, 256, device=DEVICE, dtype=dtype)
        with torch.inference_mode():
            model(x)  # warm-up
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                model(x)
            sync()
            secs = time.perf_counter() - t0
        emit(bench="emonet_forward", batch=batch, dtype=str(dtype).removeprefix("torch."),
             images_per_s=batch * iters / secs)


def mobilenetv2_train(steps):
    import torchvision

    for side, batch in student_shapes():
        model = torchvision.models.mobilenet_v2(num_classes=10).train().to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.rand(batch, 3, side, side, device=DEVICE)
        y = torch.arange(batch, device=DEVICE) % 8

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x)[:, :8], y)
            loss.backward()
            opt.step()

        for _ in range(2):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        secs = time.perf_counter() - t0
        emit(bench="mobilenetv2_train", side=side, batch=batch, images_per_s=batch * steps / secs)


def faceapi_onnx():
    try:
        import onnxruntime as ort
    except ImportError:
        print("SKIPPED faceapi_onnx: onnxruntime is not installed", file=sys.stderr)
        return
    reference = pathlib.Path(os.environ.get("DISTILLERY_REFERENCE", ROOT.parent / "shared/reference"))
    model = reference / "teachers/faceapi_expression.onnx"
    if not model.is_file():
        print(f"SKIPPED faceapi_onnx: {model} not found", file=sys.stderr)
        return
    provider = "CUDAExecutionProvider" if DEVICE.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        print(f"SKIPPED faceapi_onnx: onnxruntime has no {provider}", file=sys.stderr)
        return
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=[provider])
    inp = sess.get_inputs()[0]
    for batch in (1, 32):
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        shape[0] = batch
        x = (np.random.rand(*shape) * 255).astype(np.float32)
        sess.run(None, {inp.name: x})
        iters = 300 if batch == 1 else 20
        t0 = time.perf_counter()
        for _ in range(iters):
            sess.run(None, {inp.name: x})
        secs = time.perf_counter() - t0
        emit(bench="faceapi_onnx", batch=batch, images_per_s=batch * iters / secs,
             runtime=f"onnxruntime {ort.__version__} ({provider})")


if __name__ == "__main__":
    chosen = os.environ.get("BENCHES", "emonet_forward,mobilenetv2_train,faceapi_onnx").split(",")
    if "emonet_forward" in chosen:
        emonet_forward(int(os.environ.get("EMONET_BENCH_ITERS", 3)))
    if "mobilenetv2_train" in chosen:
        mobilenetv2_train(int(os.environ.get("STUDENT_BENCH_STEPS", 5)))
    if "faceapi_onnx" in chosen:
        faceapi_onnx()
