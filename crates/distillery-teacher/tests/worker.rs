//! The worker loop against an in-process fake coordinator over real TCP: every shard is labelled
//! and handed in, a coordinator restart is survived by registering again, and shutdown drains the
//! current shard (or releases it when the drain timeout passes). Waits are on state changes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distillery_core::FaceId;
use distillery_data::{FaceRecord, Split};
use distillery_models::teacher::TeacherInfo;
use distillery_proto::transport::{Target, TlsPaths};
use distillery_proto::v1;
use distillery_proto::v1::coordinator_service_server::{CoordinatorService, CoordinatorServiceServer};
use distillery_proto::v1::teacher_service_client::TeacherServiceClient;
use distillery_teacher::pipeline::{MemorySink, RowSink};
use distillery_teacher::service::SERVICE_NAME;
use distillery_teacher::{ShardStorage, WorkerConfig, spawn_worker};
use tokio::sync::{Semaphore, oneshot, watch};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Default)]
struct State {
    pending: VecDeque<v1::ShardRange>,
    session: u64,
    /// RegisterWorker calls received, answered or not.
    register_calls: u32,
    registrations: u32,
    leases_granted: u32,
    heartbeats: u32,
    completed: Vec<v1::CompleteShardRequest>,
    failed: Vec<v1::FailShardRequest>,
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    views: u32,
    /// When set, RegisterWorker waits for a permit before answering.
    register_gate: Option<Arc<Semaphore>>,
}

impl Fake {
    fn new(shards: u64, faces_per_shard: u64, views: u32) -> Self {
        let pending = (0..shards)
            .map(|i| v1::ShardRange { fragment_id: 0, offset: i * faces_per_shard, len: faces_per_shard })
            .collect();
        Self {
            state: Arc::new(Mutex::new(State { pending, ..Default::default() })),
            changed: watch::channel(0).0,
            views,
            register_gate: None,
        }
    }

    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.state.lock().unwrap());
        self.changed.send_modify(|v| *v += 1);
        r
    }

    /// Waits (on state changes, with a generous guard) until `cond` holds.
    async fn until(&self, what: &str, cond: impl Fn(&State) -> bool) {
        let mut rx = self.changed.subscribe();
        let wait = rx.wait_for(|_| cond(&self.state.lock().unwrap()));
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap();
    }

    fn check_session(&self, s: &str) -> Result<(), Status> {
        let cur = self.state.lock().unwrap().session;
        if cur != 0 && s == cur.to_string() {
            Ok(())
        } else {
            Err(Status::failed_precondition("unknown session"))
        }
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl CoordinatorService for Fake {
    async fn submit_label_job(&self, _: Request<v1::SubmitLabelJobRequest>) -> R<v1::SubmitLabelJobResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_job(&self, _: Request<v1::GetJobRequest>) -> R<v1::Job> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_jobs(&self, _: Request<v1::ListJobsRequest>) -> R<v1::ListJobsResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn cancel_job(&self, _: Request<v1::CancelJobRequest>) -> R<v1::Job> {
        Err(Status::unimplemented("fake"))
    }
    type WatchJobStream = tokio_stream::Empty<Result<v1::JobEvent, Status>>;
    async fn watch_job(&self, _: Request<v1::WatchJobRequest>) -> R<Self::WatchJobStream> {
        Err(Status::unimplemented("fake"))
    }
    async fn register_worker(&self, r: Request<v1::RegisterWorkerRequest>) -> R<v1::RegisterWorkerResponse> {
        let r = r.into_inner();
        // A pinned worker names its teacher; a generic one names none.
        let generic = r.teacher_name.is_empty() && r.teacher_fingerprint.is_empty();
        assert!(
            generic || (!r.teacher_fingerprint.is_empty() && r.teacher_name.starts_with("tiny")),
            "{r:?}"
        );
        self.update(|s| s.register_calls += 1);
        if let Some(g) = &self.register_gate {
            let _permit = g.acquire().await.unwrap();
        }
        let session = self.update(|s| {
            s.registrations += 1;
            s.session = next_session();
            s.session
        });
        Ok(Response::new(v1::RegisterWorkerResponse {
            session: session.to_string(),
            lease_ttl_ms: 3000,
            heartbeat_interval_ms: 20,
            max_attempts: 3,
        }))
    }
    async fn lease_shard(&self, r: Request<v1::LeaseShardRequest>) -> R<v1::LeaseShardResponse> {
        self.check_session(&r.get_ref().session)?;
        let outcome = self.update(|s| match s.pending.pop_front() {
            Some(range) => {
                s.leases_granted += 1;
                v1::lease_shard_response::Outcome::Lease(v1::ShardLease {
                    lease_id: format!("lease-{}", s.leases_granted),
                    job_id: "job".into(),
                    shard_id: range.offset,
                    shard_key: format!("job/{}:{}+{}", range.fragment_id, range.offset, range.len),
                    range: Some(range),
                    faces_uri: "mem://faces".into(),
                    cache_uri: "mem://cache".into(),
                    views: self.views,
                    attempt: 1,
                    ..Default::default()
                })
            }
            None => v1::lease_shard_response::Outcome::NoWork(v1::NoWork {
                retry_after_ms: 10,
                reason: "idle".into(),
            }),
        });
        Ok(Response::new(v1::LeaseShardResponse { outcome: Some(outcome) }))
    }
    async fn heartbeat(&self, r: Request<v1::HeartbeatRequest>) -> R<v1::HeartbeatResponse> {
        self.check_session(&r.get_ref().session)?;
        self.update(|s| s.heartbeats += 1);
        let leases = r
            .into_inner()
            .leases
            .into_iter()
            .map(|l| v1::LeaseHeartbeat {
                lease_id: l.lease_id,
                status: v1::LeaseStatus::Active as i32,
                deadline_unix_ms: 0,
            })
            .collect();
        Ok(Response::new(v1::HeartbeatResponse { leases }))
    }
    async fn complete_shard(&self, r: Request<v1::CompleteShardRequest>) -> R<v1::CompleteShardResponse> {
        self.update(|s| s.completed.push(r.into_inner()));
        Ok(Response::new(v1::CompleteShardResponse {
            outcome: v1::CompletionOutcome::Committed as i32,
            ..Default::default()
        }))
    }
    async fn fail_shard(&self, r: Request<v1::FailShardRequest>) -> R<v1::FailShardResponse> {
        self.update(|s| s.failed.push(r.into_inner()));
        Ok(Response::new(v1::FailShardResponse { shard_state: v1::ShardState::Pending as i32, attempts: 1 }))
    }
}

/// Session tokens unique across every fake in the process, so a restarted fake rejects old ones.
fn next_session() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

async fn start_fake(
    fake: Fake,
    addr: SocketAddr,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    start_fake_with(fake, addr, None).await
}

/// [`start_fake`], over TLS when `tls` is given.
async fn start_fake_with(
    fake: Fake,
    addr: SocketAddr,
    tls: Option<TlsPaths>,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let bound = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.server_config().unwrap()).unwrap();
    }
    let task = tokio::spawn(async move {
        builder
            .add_service(CoordinatorServiceServer::new(fake))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (bound, tx, task)
}

fn face(i: u64) -> FaceRecord {
    let img = image::RgbImage::from_fn(9, 9, |x, y| {
        image::Rgb([(x as u64 * 17 + i) as u8, (y * 23) as u8, (i * 5) as u8])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    let image = buf.into_inner();
    FaceRecord {
        id: FaceId::of(&image, None),
        image,
        width: 9,
        height: 9,
        box_xywh: None,
        label: None,
        valence: None,
        arousal: None,
        split: Split::Train,
        source: format!("mem:{i}"),
    }
}

/// Faces generated from the shard range; optionally blocks reads until the test releases them.
#[derive(Default)]
struct MemStorage {
    gate: Option<Arc<Semaphore>>,
    reads: watch::Sender<u32>,
}

#[async_trait::async_trait]
impl ShardStorage for MemStorage {
    async fn read_faces(&self, lease: &v1::ShardLease) -> distillery_teacher::Result<Vec<FaceRecord>> {
        self.reads.send_modify(|n| *n += 1);
        if let Some(g) = &self.gate {
            let _permit = g.acquire().await.unwrap();
        }
        let r = lease.range.as_ref().unwrap();
        Ok((r.offset..r.offset + r.len).map(face).collect())
    }
    async fn open_sink(
        &self,
        _lease: &v1::ShardLease,
        _teacher: &TeacherInfo,
        _worker_id: &str,
    ) -> distillery_teacher::Result<Box<dyn RowSink>> {
        Ok(Box::new(MemorySink::default()))
    }
}

fn config(coordinator: SocketAddr) -> WorkerConfig {
    WorkerConfig {
        coordinator: format!("http://{coordinator}"),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        teacher: Some("tiny:4:8".into()),
        max_batch: 8,
        max_delay_ms: 2,
        decode_threads: 2,
        queue_capacity: 8,
        worker_id: Some("w-test".into()),
        retry_initial_ms: 10,
        retry_max_ms: 100,
        ..WorkerConfig::default()
    }
}

fn staged_keys(c: &v1::CompleteShardRequest) -> usize {
    serde_json::from_slice::<Vec<(String, u32)>>(&c.staged_fragments).unwrap().len()
}

#[tokio::test]
async fn every_shard_is_labelled_and_handed_in() {
    let fake = Fake::new(3, 4, 1);
    let (addr, _stop, _task) = start_fake(fake.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let w = spawn_worker(config(addr), Arc::new(MemStorage::default())).await.unwrap();
    fake.until("three completions", |s| s.completed.len() == 3).await;
    w.stop().await.unwrap();
    let s = fake.state.lock().unwrap();
    assert_eq!(s.registrations, 1);
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    for c in &s.completed {
        assert_eq!(c.worker_id, "w-test");
        assert_eq!(c.rows_written, 8, "4 faces x 2 views");
        assert_eq!(staged_keys(c), 8);
    }
    let mut leases: Vec<&str> = s.completed.iter().map(|c| c.lease_id.as_str()).collect();
    leases.sort();
    assert_eq!(leases, ["lease-1", "lease-2", "lease-3"]);
}

#[tokio::test]
async fn a_restarted_coordinator_gets_a_new_registration() {
    let first = Fake::new(1, 2, 0);
    let (addr, stop, task) = start_fake(first.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let storage = Arc::new(MemStorage::default());
    let w = spawn_worker(config(addr), storage).await.unwrap();
    first.until("the first shard", |s| s.completed.len() == 1).await;
    stop.send(()).unwrap();
    task.await.unwrap();

    // Same address, fresh state: the old session is unknown there.
    let second = Fake::new(2, 2, 0);
    let (_addr, _stop2, _task2) = start_fake(second.clone(), addr).await;
    second.until("both shards after the restart", |s| s.completed.len() == 2).await;
    assert!(second.state.lock().unwrap().registrations >= 1);
    assert!(w.metrics.errors(distillery_teacher::metrics::error_kind::COORDINATOR) >= 1);
    w.stop().await.unwrap();
}

/// Health of the worker as a whole (`""`, what Kubernetes probes ask) and of `TeacherService`.
async fn health(addr: SocketAddr, service: &str) -> ServingStatus {
    let ch =
        tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Follows the health of `service` (Health/Watch) until it reports `want`.
async fn until_health(addr: SocketAddr, service: &str, want: ServingStatus) {
    let ch =
        tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut updates = HealthClient::new(ch)
        .watch(tonic_health::pb::HealthCheckRequest { service: service.into() })
        .await
        .unwrap()
        .into_inner();
    let wait = async {
        while let Some(u) = updates.message().await.unwrap() {
            if u.status() == want {
                return;
            }
        }
        panic!("health stream of {service:?} ended before {want:?}");
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {service:?} to be {want:?}"));
}

/// A worker without `--teacher` is ready (health `""` SERVING) as soon as it is registered and can
/// take work, with no teacher loaded and no lease yet; it is not ready before, nor once it lost the
/// coordinator. `TeacherService` itself is NOT_SERVING while no teacher is loaded.
#[tokio::test]
async fn a_generic_worker_is_serving_once_registered() {
    let gate = Arc::new(Semaphore::new(0));
    let fake = Fake { register_gate: Some(gate.clone()), ..Fake::new(0, 1, 0) };
    let (addr, stop, task) = start_fake(fake.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let cfg = WorkerConfig { teacher: None, ..config(addr) };
    let w = spawn_worker(cfg, Arc::new(MemStorage::default())).await.unwrap();

    // Registration asked for but not answered yet: not ready.
    fake.until("a RegisterWorker call", |s| s.register_calls >= 1).await;
    assert_eq!(health(w.addr, "").await, ServingStatus::NotServing);

    gate.add_permits(100);
    until_health(w.addr, "", ServingStatus::Serving).await;
    assert_eq!(health(w.addr, SERVICE_NAME).await, ServingStatus::NotServing, "no teacher is loaded");
    {
        let s = fake.state.lock().unwrap();
        assert_eq!(s.registrations, 1);
        assert_eq!(s.leases_granted, 0, "ready without any lease");
    }

    // The coordinator goes away: the worker cannot take work any more.
    stop.send(()).unwrap();
    task.await.unwrap();
    until_health(w.addr, "", ServingStatus::NotServing).await;
    w.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_the_current_shard_then_stops() {
    let fake = Fake::new(3, 3, 0);
    let (addr, _stop, _task) = start_fake(fake.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let gate = Arc::new(Semaphore::new(0));
    let storage = Arc::new(MemStorage { gate: Some(gate.clone()), ..Default::default() });
    let mut reads = storage.reads.subscribe();
    let w = spawn_worker(config(addr), storage.clone()).await.unwrap();
    reads.wait_for(|n| *n == 1).await.unwrap();
    w.shutdown();
    gate.add_permits(10);
    w.handle.await.unwrap().unwrap();
    let s = fake.state.lock().unwrap();
    assert_eq!(s.leases_granted, 1, "no lease is taken while draining");
    assert_eq!(s.completed.len(), 1);
    assert_eq!(s.completed[0].rows_written, 3);
    assert!(s.failed.is_empty());
}

#[tokio::test]
async fn shutdown_releases_a_shard_that_outlasts_the_drain_timeout() {
    let fake = Fake::new(2, 3, 0);
    let (addr, _stop, _task) = start_fake(fake.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let storage = Arc::new(MemStorage { gate: Some(Arc::new(Semaphore::new(0))), ..Default::default() });
    let mut reads = storage.reads.subscribe();
    let cfg = WorkerConfig { drain_timeout_ms: 30, ..config(addr) };
    let w = spawn_worker(cfg, storage.clone()).await.unwrap();
    reads.wait_for(|n| *n == 1).await.unwrap();
    w.stop().await.unwrap();
    let s = fake.state.lock().unwrap();
    assert!(s.completed.is_empty());
    assert_eq!(s.failed.len(), 1);
    assert!(s.failed[0].retryable);
    assert!(s.failed[0].error.contains("shutting down"), "{}", s.failed[0].error);
    assert_eq!(s.leases_granted, 1);
}

fn tls_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tls").join(name)
}

fn server_tls() -> TlsPaths {
    TlsPaths { cert: tls_fixture("server.pem"), key: tls_fixture("server.key") }
}

/// A worker configured for the TLS fake at `addr`, trusting `ca`.
fn tls_config(addr: SocketAddr, ca: &str) -> WorkerConfig {
    WorkerConfig {
        coordinator: format!("https://localhost:{}", addr.port()),
        tls_ca: Some(tls_fixture(ca)),
        ..config(addr)
    }
}

/// Over TLS both ways: a worker trusting the test CA registers with a TLS coordinator (by DNS name
/// `localhost`) and hands in every shard; its own `TeacherService`, served with `tls`, answers a
/// client that trusts the CA and nothing to a plaintext one.
#[tokio::test]
async fn a_worker_with_the_ca_labels_for_a_tls_coordinator_and_serves_tls() {
    let fake = Fake::new(3, 2, 0);
    let (addr, _stop, _task) =
        start_fake_with(fake.clone(), SocketAddr::from(([127, 0, 0, 1], 0)), Some(server_tls())).await;
    let cfg = WorkerConfig { tls: Some(server_tls()), ..tls_config(addr, "ca.pem") };
    let w = spawn_worker(cfg, Arc::new(MemStorage::default())).await.unwrap();
    fake.until("three completions over TLS", |s| s.completed.len() == 3).await;
    {
        let s = fake.state.lock().unwrap();
        assert_eq!(s.registrations, 1);
        assert!(s.failed.is_empty(), "{:?}", s.failed);
        assert!(s.completed.iter().all(|c| c.rows_written == 2), "{:?}", s.completed);
    }

    let worker = Target::new(format!("https://127.0.0.1:{}", w.addr.port()));
    let ch = worker
        .clone()
        .with_tls_ca(Some(tls_fixture("ca.pem")))
        .connect(Duration::from_secs(10))
        .await
        .unwrap();
    let info = TeacherServiceClient::new(ch).model_info(v1::ModelInfoRequest {}).await.unwrap().into_inner();
    assert!(info.name.starts_with("tiny"), "{info:?}");
    let plaintext = async {
        let ch =
            tonic::transport::Channel::from_shared(format!("http://{}", w.addr)).unwrap().connect().await?;
        TeacherServiceClient::new(ch).model_info(v1::ModelInfoRequest {}).await.map_err(Into::into)
    };
    let r: Result<_, Box<dyn std::error::Error>> =
        tokio::time::timeout(Duration::from_secs(30), plaintext).await.expect("plaintext call hung");
    assert!(r.is_err(), "a plaintext client got an answer from a TLS worker: {r:?}");
    w.stop().await.unwrap();
}

/// A worker that trusts another CA never gets through the TLS handshake: the coordinator sees no
/// RegisterWorker call while the worker counts failed attempts. A CA file that is no certificate is
/// refused at start, naming the file.
#[tokio::test]
async fn a_worker_with_the_wrong_ca_never_registers() {
    let fake = Fake::new(1, 2, 0);
    let (addr, _stop, _task) =
        start_fake_with(fake.clone(), SocketAddr::from(([127, 0, 0, 1], 0)), Some(server_tls())).await;
    let w = spawn_worker(tls_config(addr, "other-ca.pem"), Arc::new(MemStorage::default())).await.unwrap();
    let coordinator_errors = || w.metrics.errors(distillery_teacher::metrics::error_kind::COORDINATOR);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while coordinator_errors() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the worker did not retry the coordinator");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let s = fake.state.lock().unwrap();
        assert_eq!((s.register_calls, s.leases_granted), (0, 0));
    }
    w.stop().await.unwrap();

    let e = match spawn_worker(tls_config(addr, "server.key"), Arc::new(MemStorage::default())).await {
        Ok(_) => panic!("a private key was accepted as the CA certificate"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("`tls_ca`") && e.contains("server.key"), "{e}");
}
