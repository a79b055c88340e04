//! The gRPC adapter over real TCP on 127.0.0.1:0 with a tonic client: a fake worker loop labels a
//! job while WatchJob streams its progress; auth, argument errors, health and metrics.

mod common;

use std::sync::Arc;

use common::*;
use distillery_coordinator::{Backends, CoordinatorConfig, RunningCoordinator, SystemClock, spawn_with};
use distillery_proto::v1;
use distillery_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const TOKEN: &str = "test-token-123";

type Client = CoordinatorServiceClient<InterceptedService<Channel, AddToken>>;

#[derive(Clone)]
struct AddToken(Option<&'static str>);

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = self.0 {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(req)
    }
}

async fn start(dir: &std::path::Path) -> (RunningCoordinator, Arc<distillery_coordinator::MemoryBackend>) {
    start_with(CoordinatorConfig::new(dir)).await
}

async fn start_with(
    mut cfg: CoordinatorConfig,
) -> (RunningCoordinator, Arc<distillery_coordinator::MemoryBackend>) {
    let b = backend();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.auth_token = Some(TOKEN.into());
    let running = spawn_with(cfg, Backends::from_shared(b.clone()), Arc::new(SystemClock)).await.unwrap();
    (running, b)
}

async fn channel(r: &RunningCoordinator) -> Channel {
    tonic::transport::Endpoint::from_shared(r.endpoint(false)).unwrap().connect().await.unwrap()
}

async fn client(r: &RunningCoordinator, token: Option<&'static str>) -> Client {
    CoordinatorServiceClient::with_interceptor(channel(r).await, AddToken(token))
}

fn submit_request(shard_size: u64) -> v1::SubmitLabelJobRequest {
    v1::SubmitLabelJobRequest {
        spec: Some(v1::LabelJobSpec {
            faces_uri: FACES.into(),
            cache_uri: CACHE.into(),
            teacher: Some(v1::TeacherSpec {
                kind: v1::TeacherKind::Emonet8 as i32,
                weights_path: "/w/emonet_8.pth".into(),
                ..Default::default()
            }),
            views: 2,
            shard_size,
            ..Default::default()
        }),
    }
}

/// Registers, then leases and completes shards until there is no work.
async fn fake_worker(c: Client, id: &str) -> u32 {
    fake_worker_beating(c, id, 1).await
}

/// [`fake_worker`] sending `beats` heartbeats per shard (progress 1, 2, … images).
async fn fake_worker_beating(mut c: Client, id: &str, beats: u64) -> u32 {
    let reg = c
        .register_worker(v1::RegisterWorkerRequest {
            worker_id: id.into(),
            teacher_name: "emonet-8".into(),
            teacher_fingerprint: "a".repeat(32),
            device: "cpu".into(),
            max_batch: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reg.lease_ttl_ms > 0 && reg.heartbeat_interval_ms < reg.lease_ttl_ms);
    let mut done = 0;
    loop {
        let resp = c
            .lease_shard(v1::LeaseShardRequest { worker_id: id.into(), session: reg.session.clone() })
            .await
            .unwrap()
            .into_inner();
        let lease = match resp.outcome.unwrap() {
            v1::lease_shard_response::Outcome::Lease(l) => l,
            v1::lease_shard_response::Outcome::NoWork(_) => return done,
        };
        assert_eq!(lease.views, 2);
        assert_eq!(lease.teacher_fingerprint, "a".repeat(32));
        let range = lease.range.unwrap();
        for images_done in 1..=beats {
            let hb = c
                .heartbeat(v1::HeartbeatRequest {
                    worker_id: id.into(),
                    session: reg.session.clone(),
                    leases: vec![v1::LeaseProgress { lease_id: lease.lease_id.clone(), images_done }],
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(hb.leases[0].status, v1::LeaseStatus::Active as i32);
        }
        let out = c
            .complete_shard(v1::CompleteShardRequest {
                worker_id: id.into(),
                lease_id: lease.lease_id.clone(),
                staged_fragments: staged(&lease.shard_key),
                rows_written: range.len * 3,
                skipped: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.outcome, v1::CompletionOutcome::Committed as i32, "{}", out.detail);
        done += 1;
    }
}

#[tokio::test]
async fn worker_loop_completes_job_while_watch_streams_progress() {
    let dir = tempfile::tempdir().unwrap();
    let (running, backend) = start(dir.path()).await;
    let mut c = client(&running, Some(TOKEN)).await;
    let job = c.submit_label_job(submit_request(2)).await.unwrap().into_inner();
    assert!(!job.already_active);
    let job = job.job.unwrap();
    assert_eq!(job.shards.as_ref().unwrap().total, 5);
    assert_eq!(job.state, v1::JobState::Running as i32);

    let mut stream =
        c.watch_job(v1::WatchJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    let worker = tokio::spawn(fake_worker(client(&running, Some(TOKEN)).await, "w1"));

    let mut events = Vec::new();
    while let Some(ev) = stream.message().await.unwrap() {
        events.push(ev);
    }
    assert_eq!(worker.await.unwrap(), 5);
    assert_eq!(events[0].kind, v1::JobEventKind::Snapshot as i32);
    let last = events.last().unwrap();
    assert_eq!(last.kind, v1::JobEventKind::StateChanged as i32);
    assert_eq!(last.previous_state, v1::JobState::Running as i32);
    let j = last.job.as_ref().unwrap();
    assert_eq!(j.state, v1::JobState::Completed as i32);
    assert_eq!((j.images_done, j.images_total), (8, 8));
    assert_eq!(j.rows_written, 24);
    assert_eq!(j.teacher_fingerprint, "a".repeat(32));
    // Committed counts only grow along the stream.
    let committed: Vec<u64> =
        events.iter().map(|e| e.job.as_ref().unwrap().shards.unwrap().committed).collect();
    assert!(committed.windows(2).all(|w| w[0] <= w[1]), "{committed:?}");
    assert!(events.len() >= 6, "expected progress events, got {}", events.len());
    assert_eq!(backend.commit_count(CACHE), 5);

    let listed =
        c.list_jobs(v1::ListJobsRequest { states: vec![v1::JobState::Completed as i32], limit: 0 }).await;
    assert_eq!(listed.unwrap().into_inner().jobs.len(), 1);

    // Metrics reflect the work.
    let text = http_get(running.metrics_addr.unwrap(), "/metrics").await;
    assert!(text.contains("distillery_coordinator_leases_granted_total 5"), "{text}");
    assert!(text.contains("distillery_coordinator_completions_total{state=\"committed\"} 5"), "{text}");
    running.shutdown().await.unwrap();
}

/// Heartbeats update progress many times a second across a pool; each `WatchJob` stream sends
/// that progress at most once per `watch_progress_interval` (here an hour, so only the first gets
/// through), while leases, commits and the final state change go out at once with the latest
/// counts.
#[tokio::test]
async fn watch_streams_send_heartbeat_progress_at_most_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CoordinatorConfig::new(dir.path());
    cfg.watch_progress_interval = std::time::Duration::from_secs(3600);
    let (running, _) = start_with(cfg).await;
    let mut c = client(&running, Some(TOKEN)).await;
    let job = c.submit_label_job(submit_request(2)).await.unwrap().into_inner().job.unwrap();
    let mut stream =
        c.watch_job(v1::WatchJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    // 5 shards × 20 heartbeats: 100 progress updates without a detail.
    let worker = tokio::spawn(fake_worker_beating(client(&running, Some(TOKEN)).await, "w1", 20));
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await.unwrap() {
        events.push(ev);
    }
    assert_eq!(worker.await.unwrap(), 5);
    let kind = |e: &v1::JobEvent| v1::JobEventKind::try_from(e.kind).unwrap();
    let plain_progress =
        events.iter().filter(|e| kind(e) == v1::JobEventKind::Progress && e.detail.is_empty());
    assert_eq!(plain_progress.count(), 1, "{events:#?}");
    let commits = events.iter().filter(|e| e.detail.ends_with("committed")).count();
    assert_eq!(commits, 5, "{events:#?}");
    let last = events.last().unwrap();
    assert_eq!(kind(last), v1::JobEventKind::StateChanged);
    let j = last.job.as_ref().unwrap();
    assert_eq!((j.state, j.images_done, j.images_total), (v1::JobState::Completed as i32, 8, 8));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn calls_without_the_token_are_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let (running, _) = start(dir.path()).await;
    let mut anon = client(&running, None).await;
    let e = anon.list_jobs(v1::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = anon.submit_label_job(submit_request(2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = anon
        .register_worker(v1::RegisterWorkerRequest { worker_id: "w".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let mut wrong =
        CoordinatorServiceClient::with_interceptor(channel(&running).await, AddToken(Some("nope")));
    let e = wrong.list_jobs(v1::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut ok = client(&running, Some(TOKEN)).await;
    assert!(ok.list_jobs(v1::ListJobsRequest::default()).await.is_ok());
    // Nothing was submitted by the refused calls.
    assert!(ok.list_jobs(v1::ListJobsRequest::default()).await.unwrap().into_inner().jobs.is_empty());
    running.shutdown().await.unwrap();
}

/// Health and reflection stay open with a token configured: kubelet gRPC probes and `grpcurl list`
/// cannot send one. Every `CoordinatorService` RPC stays guarded.
#[tokio::test]
async fn health_and_reflection_answer_without_the_token() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let (running, _) = start(dir.path()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&running).await);
    for service in ["", "distillery.v1.CoordinatorService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await
            .unwrap_or_else(|e| panic!("health {service:?} without a token: {e}"))
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel(&running).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream =
        reflection.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "distillery.v1.CoordinatorService"), "{names:?}");

    let mut anon = client(&running, None).await;
    let e = anon.submit_label_job(submit_request(2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (running, _) = start(dir.path()).await;
    let mut c = client(&running, Some(TOKEN)).await;

    let mut r = submit_request(2);
    r.spec.as_mut().unwrap().faces_uri.clear();
    let e = c.submit_label_job(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("spec.faces_uri"), "{}", e.message());

    let mut r = submit_request(2);
    r.spec.as_mut().unwrap().teacher.as_mut().unwrap().kind = 0;
    let e = c.submit_label_job(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("spec.teacher.kind"), "{}", e.message());

    let mut r = submit_request(2);
    r.spec.as_mut().unwrap().teacher.as_mut().unwrap().fingerprint = "XYZ".into();
    let e = c.submit_label_job(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("spec.teacher.fingerprint"), "{}", e.message());

    let mut r = submit_request(2);
    r.spec.as_mut().unwrap().faces_uri = "mem://missing".into();
    let e = c.submit_label_job(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("mem://missing"), "{}", e.message());

    let e = c.submit_label_job(v1::SubmitLabelJobRequest { spec: None }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let e = c
        .register_worker(v1::RegisterWorkerRequest { worker_id: "bad id!".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("worker_id"), "{}", e.message());

    let e = c
        .complete_shard(v1::CompleteShardRequest {
            worker_id: "w".into(),
            lease_id: "l".into(),
            staged_fragments: b"{not json".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("staged_fragments"), "{}", e.message());

    let e = c.get_job(v1::GetJobRequest { job_id: "0".repeat(32) }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .lease_shard(v1::LeaseShardRequest { worker_id: "ghost".into(), session: "s".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_reports_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (running, _) = start(dir.path()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::with_interceptor(
        channel(&running).await,
        AddToken(Some(TOKEN)),
    );
    for service in ["", "distillery.v1.CoordinatorService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    running.shutdown().await.unwrap();
}

/// Shutdown does not wait for running jobs: open WatchJob streams end with UNAVAILABLE (the job
/// goes on after a restart, so clients watch again).
#[tokio::test]
async fn shutdown_ends_open_watch_streams_with_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let (running, _) = start(dir.path()).await;
    let mut c = client(&running, Some(TOKEN)).await;
    let job = c.submit_label_job(submit_request(2)).await.unwrap().into_inner().job.unwrap();
    let mut events =
        c.watch_job(v1::WatchJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    let snapshot = events.message().await.unwrap().unwrap();
    assert_eq!(snapshot.job.unwrap().job_id, job.job_id);
    // The job has no worker, so it cannot end: only the shutdown can close the stream.
    tokio::time::timeout(std::time::Duration::from_secs(60), running.shutdown())
        .await
        .expect("shutdown waited for an open WatchJob stream")
        .unwrap();
    let e = events.message().await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("shutting down"), "{e}");
}

/// A minimal HTTP/1.0 GET (the test needs no HTTP client crate).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"), "{out}");
    out
}
