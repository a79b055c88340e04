#!/usr/bin/env python3
"""Submit a labelling job to a Distillery coordinator with grpcio and follow it to its end.

The stubs are generated from this checkout's proto/ at run time with grpcio-tools, into a temporary
directory, so the client always speaks the API of the code next to it. Needs `grpcio` and
`grpcio-tools` (pip install grpcio grpcio-tools). Prints one JSON line with the final job on stdout;
progress goes to stderr. Exits 0 when the job completed, 2 when it ended in another state, 1 on an
error.

    python3 tests/python/client.py --coordinator 127.0.0.1:50051 \
        --faces /data/faces.lance --cache /data/cache.lance \
        --teacher-kind student --teacher-path /runs/teacher --views 1 --shard-size 256

It is also what tests/cluster.rs runs against real coordinator and worker processes.
"""

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


def log(msg):
    print(f"client.py: {msg}", file=sys.stderr, flush=True)


def generate_stubs(proto_root, out_dir):
    """Compiles every distillery/v1/*.proto under proto_root into Python modules in out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    files = sorted(p.relative_to(proto_root).as_posix() for p in (proto_root / "distillery" / "v1").glob("*.proto"))
    if not files:
        raise SystemExit(f"no .proto files under {proto_root / 'distillery' / 'v1'}")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"grpc_tools.protoc failed with status {rc} on {files}")
    # The generated modules import each other as `distillery.v1.*_pb2`.
    sys.path.insert(0, str(out_dir))
    common = importlib.import_module("distillery.v1.common_pb2")
    coordinator = importlib.import_module("distillery.v1.coordinator_pb2")
    rpc = importlib.import_module("distillery.v1.coordinator_pb2_grpc")
    return common, coordinator, rpc


def job_json(common, job, **extra):
    s = job.shards
    out = {
        "job_id": job.job_id,
        "state": common.JobState.Name(job.state),
        "job_fingerprint": job.job_fingerprint,
        "teacher_fingerprint": job.teacher_fingerprint,
        "images_total": job.images_total,
        "images_done": job.images_done,
        "images_skipped": job.images_skipped,
        "rows_written": job.rows_written,
        "shards": {
            "pending": s.pending,
            "leased": s.leased,
            "committed": s.committed,
            "skipped": s.skipped,
            "poisoned": s.poisoned,
            "cancelled": s.cancelled,
            "total": s.total,
        },
        "poisoned": [
            {"shard_id": p.shard_id, "attempts": p.attempts, "last_error": p.last_error} for p in job.poisoned
        ],
        "error": job.error,
    }
    out.update(extra)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coordinator", required=True, help="host:port (an http:// prefix is accepted)")
    ap.add_argument("--faces", required=True, help="faces dataset URI")
    ap.add_argument("--cache", required=True, help="teacher cache URI")
    ap.add_argument("--teacher-kind", required=True, choices=["emonet_8", "emonet_5", "onnx", "student"])
    ap.add_argument("--teacher-path", default="", help="ONNX teacher TOML or student run directory")
    ap.add_argument("--weights", default="", help="weights path (EmoNet)")
    ap.add_argument("--teacher-fingerprint", default="")
    ap.add_argument("--views", type=int, default=0)
    ap.add_argument("--view-seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=0)
    ap.add_argument("--token", default=None, help="bearer token")
    ap.add_argument("--proto-root", type=Path, default=DEFAULT_PROTO_ROOT)
    ap.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    args = ap.parse_args()

    import grpc

    target = args.coordinator
    for prefix in ("http://", "https://"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
    deadline = time.monotonic() + args.timeout
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []

    with tempfile.TemporaryDirectory(prefix="distillery-stubs-") as tmp:
        common, pb, rpc = generate_stubs(args.proto_root.resolve(), Path(tmp))
        terminal = {
            common.JOB_STATE_COMPLETED,
            common.JOB_STATE_COMPLETED_WITH_POISONED,
            common.JOB_STATE_FAILED,
            common.JOB_STATE_CANCELLED,
        }
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))
            stub = rpc.CoordinatorServiceStub(channel)
            spec = pb.LabelJobSpec(
                faces_uri=args.faces,
                cache_uri=args.cache,
                teacher=common.TeacherSpec(
                    kind=common.TeacherKind.Value("TEACHER_KIND_" + args.teacher_kind.upper()),
                    config_path=args.teacher_path,
                    weights_path=args.weights,
                    fingerprint=args.teacher_fingerprint,
                ),
                views=args.views,
                shard_size=args.shard_size,
                view_seed=args.view_seed,
            )
            resp = stub.SubmitLabelJob(pb.SubmitLabelJobRequest(spec=spec), metadata=metadata, timeout=60)
            job = resp.job
            log(f"job {job.job_id} submitted (already active: {resp.already_active}), {job.shards.total} shards")
            events = 0
            kinds = {}
            while job.state not in terminal:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"job {job.job_id} still {common.JobState.Name(job.state)} at the deadline")
                try:
                    stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=metadata, timeout=left)
                    for event in stream:
                        events += 1
                        name = pb.JobEventKind.Name(event.kind)
                        kinds[name] = kinds.get(name, 0) + 1
                        job = event.job
                        s = job.shards
                        log(f"{name}: {common.JobState.Name(job.state)} {s.committed + s.skipped}/{s.total} shards")
                        if job.state in terminal:
                            break
                except grpc.RpcError as e:
                    # The stream may end or break (a coordinator restart); read the job and watch again.
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        raise
                    log(f"WatchJob: {e.code().name}; watching again")
                    time.sleep(0.2)
                if job.state not in terminal:
                    job = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=metadata, timeout=30)
            print(json.dumps(job_json(common, job, already_active=resp.already_active, events=events, event_kinds=kinds)), flush=True)
            return 0 if job.state == common.JOB_STATE_COMPLETED else 2


if __name__ == "__main__":
    sys.exit(main())
