//! A labelling cluster made of real processes: `distillery serve coordinator`, three
//! `distillery serve teacher` workers and the `distillery label` client, talking gRPC over loopback
//! TCP, with the teacher a student run trained in a second by `distillery train`.
//!
//! Every test ends by reading the Lance cache back and checking the promise of the architecture:
//! exactly one row per (face, view), nothing lost, nothing duplicated — also after a worker is
//! killed with SIGKILL in the middle of a shard and after the coordinator is killed and restarted
//! on the same state directory. Waits poll observable state (job state over gRPC, Prometheus
//! metrics, files) against a deadline; nothing waits on a fixed sleep.
//!
//! Child processes are killed when their guard drops, also when a test fails; a failing test
//! prints the tail of every service's log.
#![allow(clippy::print_stdout)]

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use distillery_cache::{FaceStore, TeacherCache};
use distillery_core::TeacherFingerprint;
use distillery_proto::transport::Target;
use distillery_proto::v1;
use distillery_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use serde_json::Value;

/// Logs of the services: ours at info, the storage stack's chatter off.
const SERVICE_LOG: &str = "warn,distillery_coordinator=info,distillery_teacher=info";
/// Longest any single wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(120);
/// Side of the synthetic faces and of the teacher's input.
const SIDE: &str = "64";

/// The tests share two cores: one cluster at a time keeps lease deadlines meaningful.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `probe` until it returns `Some`, failing the test after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A free loopback port (for listeners whose bound address the binary does not report).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port")
}

/// `GET path` over HTTP/1.0; the body when the answer is 200.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.lines().next()?.contains(" 200").then(|| body.to_owned())
}

/// The value of one series (`name{labels}` exactly as exported) in a Prometheus text page.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        if k == name { v.parse().ok() } else { None }
    })
}

/// Like [`series`], for a series that must be exported.
fn must(text: &str, name: &str) -> f64 {
    series(text, name).unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

fn is_terminal(state: i32) -> bool {
    matches!(
        v1::JobState::try_from(state),
        Ok(v1::JobState::Completed
            | v1::JobState::CompletedWithPoisoned
            | v1::JobState::Failed
            | v1::JobState::Cancelled)
    )
}

/// A child process, killed (SIGKILL) and reaped when dropped. On a failing test it prints the tail
/// of the process's log.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `distillery ARGS` with stderr (and stdout unless `stdout` is given) into `log`.
    fn spawn(name: &str, args: &[&str], log: PathBuf, stdout: Option<&Path>) -> Self {
        let err = File::create(&log).expect("create log");
        let out = match stdout {
            Some(p) => File::create(p).expect("create stdout file"),
            None => err.try_clone().expect("clone log"),
        };
        let child = Command::new(bin())
            .args(args)
            .env("DISTILLERY_LOG", SERVICE_LOG)
            .env("RAYON_NUM_THREADS", "2")
            .env_remove("DISTILLERY_COORDINATOR")
            .env_remove("DISTILLERY_AUTH_TOKEN")
            .env_remove("DISTILLERY_TLS_CA")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { name: name.to_owned(), child, log }
    }

    /// The exit status once the process has ended.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to end by itself.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        wait_for(&what, timeout, || self.exited())
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            println!("----- {} ({}) -----\n{}", self.name, self.log.display(), self.log_tail(40));
        }
    }
}

/// Faces and a teacher for one test, in a temporary directory.
struct Data {
    faces: String,
    cache: String,
    teacher: String,
    count: u64,
    dir: tempfile::TempDir,
}

impl Data {
    /// `count` synthetic faces and a tiny student trained for two steps as the teacher.
    fn new(count: u64) -> Self {
        let dir = tempdir();
        let p = |name: &str| path_str(&dir.path().join(name)).to_owned();
        let (faces, cache, teacher) = (p("faces.lance"), p("cache.lance"), p("teacher"));
        let n = count.to_string();
        let synth = run_json(&[
            "synth", "--count", &n, "--out", &faces, "--size", SIDE, "--seed", "7", "--format", "json",
        ]);
        assert_eq!(synth["accepted"].as_u64(), Some(count), "{synth}");
        run_ok(&[
            "train",
            "--faces",
            &faces,
            "--student",
            &format!("tiny@{SIDE}"),
            "--out",
            &teacher,
            "--set",
            "optim.steps=2",
            "--set",
            "data.batch_size=16",
            "--no-progress",
        ]);
        assert!(Path::new(&teacher).join("model.safetensors").is_file(), "no trained teacher in {teacher}");
        // Workers retry the coordinator quickly, so a coordinator restart costs little time.
        std::fs::write(dir.path().join("worker.toml"), "retry_initial_ms = 100\nretry_max_ms = 500\n")
            .unwrap();
        Data { faces, cache, teacher, count, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

struct Worker {
    proc: Proc,
    metrics: SocketAddr,
    /// Its TeacherService, when the test chose the port (TLS clusters).
    grpc: Option<SocketAddr>,
}

/// A coordinator process and its teacher worker processes over one [`Data`].
struct Cluster {
    coordinator: Proc,
    workers: Vec<Worker>,
    /// Its gRPC address (kept across restarts).
    addr: SocketAddr,
    /// Its metrics address (kept across restarts).
    metrics: SocketAddr,
    lease_ttl: &'static str,
    restarts: u32,
    /// Every service serves TLS with the test certificates, every client trusts the test CA.
    tls: bool,
    rt: tokio::runtime::Runtime,
    data: Data,
}

/// A committed TLS test file (`tests/fixtures/tls`, see its README).
fn tls_fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tls").join(name);
    path_str(&p).to_owned()
}

/// `--tls-cert` and `--tls-key` of a server with the test certificate.
fn server_tls_args() -> Vec<String> {
    vec!["--tls-cert".into(), tls_fixture("server.pem"), "--tls-key".into(), tls_fixture("server.key")]
}

impl Cluster {
    fn start(data: Data, workers: usize, lease_ttl: &'static str) -> Self {
        Self::start_with(data, workers, lease_ttl, false)
    }

    fn start_with(data: Data, workers: usize, lease_ttl: &'static str, tls: bool) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let metrics = free_addr();
        let (coordinator, addr) =
            spawn_coordinator(&data, "127.0.0.1:0".parse().unwrap(), metrics, lease_ttl, 0, tls);
        let mut c =
            Cluster { coordinator, workers: vec![], addr, metrics, lease_ttl, restarts: 0, tls, rt, data };
        c.wait_serving();
        for i in 0..workers {
            c.add_worker(&format!("w{i}"));
        }
        c
    }

    /// The coordinator's URL: `http://127.0.0.1:PORT`, or with TLS `https://localhost:PORT` (the
    /// test certificate names both `localhost` and 127.0.0.1).
    fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// The coordinator as the test's own gRPC client dials it.
    fn target(&self) -> Target {
        Target::new(self.url()).with_tls_ca(self.tls.then(|| tls_fixture("ca.pem").into()))
    }

    /// `--tls-ca` for a client of this cluster (none without TLS).
    fn client_tls_args(&self) -> Vec<String> {
        if self.tls { vec!["--tls-ca".into(), tls_fixture("ca.pem")] } else { vec![] }
    }

    fn add_worker(&mut self, id: &str) {
        let metrics = free_addr();
        let grpc = self.tls.then(free_addr);
        let (url, m) = (self.url(), metrics.to_string());
        let listen = grpc.map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
        let config = self.data.path("worker.toml");
        let mut args: Vec<String> = [
            "serve",
            "teacher",
            "--config",
            path_str(&config),
            "--coordinator",
            &url,
            "--listen",
            &listen,
            "--metrics-listen",
            &m,
            "--teacher",
            &self.data.teacher,
            "--worker-id",
            id,
            "--decode-threads",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.tls {
            args.extend(self.client_tls_args());
            args.extend(server_tls_args());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc =
            Proc::spawn(&format!("worker {id}"), &args, self.data.path(&format!("worker-{id}.log")), None);
        wait_for(&format!("worker {id} to serve metrics"), DEADLINE, || {
            if let Some(s) = proc.exited() {
                panic!("worker {id} exited early ({s}):\n{}", proc.log_tail(40));
            }
            http_get(metrics, "/metrics")
        });
        self.workers.push(Worker { proc, metrics, grpc });
    }

    /// Waits until the coordinator answers gRPC calls.
    fn wait_serving(&mut self) {
        let url = self.target();
        let coordinator = &mut self.coordinator;
        let rt = &self.rt;
        wait_for("the coordinator to answer ListJobs", DEADLINE, || {
            if let Some(s) = coordinator.exited() {
                panic!("coordinator exited early ({s}):\n{}", coordinator.log_tail(40));
            }
            rt.block_on(list_jobs(url.clone())).ok()
        });
    }

    /// SIGKILLs the coordinator and starts a new one on the same state directory and addresses.
    fn kill_and_restart_coordinator(&mut self) {
        self.coordinator.kill();
        self.restarts += 1;
        let (proc, addr) =
            spawn_coordinator(&self.data, self.addr, self.metrics, self.lease_ttl, self.restarts, self.tls);
        assert_eq!(addr, self.addr, "the restarted coordinator must listen where the workers look");
        self.coordinator = proc;
        self.wait_serving();
    }

    fn coordinator_metrics(&self) -> String {
        http_get(self.metrics, "/metrics").expect("coordinator metrics")
    }

    fn worker_metrics(&self, i: usize) -> Option<String> {
        http_get(self.workers[i].metrics, "/metrics")
    }

    /// Sum of one worker series over the live workers.
    fn workers_total(&self, name: &str) -> f64 {
        (0..self.workers.len())
            .map(|i| must(&self.worker_metrics(i).unwrap_or_else(|| panic!("worker {i} metrics")), name))
            .sum()
    }

    fn get_job(&self, id: &str) -> v1::Job {
        self.rt.block_on(get_job(self.target(), id.to_owned())).unwrap_or_else(|e| panic!("GetJob {id}: {e}"))
    }

    fn submit(&self, spec: v1::LabelJobSpec) -> v1::SubmitLabelJobResponse {
        self.rt.block_on(submit(self.target(), spec)).unwrap_or_else(|e| panic!("SubmitLabelJob: {e}"))
    }

    /// Polls GetJob until the job ends.
    fn wait_job(&self, id: &str) -> v1::Job {
        wait_for(&format!("job {id} to end"), DEADLINE, || {
            // The coordinator may be restarting: a failed call is retried until the deadline.
            let job = self.rt.block_on(get_job(self.target(), id.to_owned())).ok()?;
            is_terminal(job.state).then_some(job)
        })
    }

    /// The job spec `distillery label` would submit for these data.
    fn spec(&self, views: u32, shard_size: u64) -> v1::LabelJobSpec {
        v1::LabelJobSpec {
            faces_uri: self.data.faces.clone(),
            cache_uri: self.data.cache.clone(),
            teacher: Some(v1::TeacherSpec {
                kind: v1::TeacherKind::Student as i32,
                config_path: self.data.teacher.clone(),
                ..Default::default()
            }),
            views,
            shard_size,
            ..Default::default()
        }
    }

    /// Args of `distillery label` against this cluster.
    fn label_args(&self, views: u32, shard_size: u64) -> Vec<String> {
        let d = &self.data;
        [
            "label",
            "--faces",
            &d.faces,
            "--cache",
            &d.cache,
            "--teacher",
            &d.teacher,
            "--coordinator",
            &self.url(),
            "--format",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["--views".into(), views.to_string(), "--shard-size".into(), shard_size.to_string()])
        .chain(self.client_tls_args())
        .collect()
    }

    /// Starts `distillery label` in the background; its JSON result lands in `label-N.json`.
    fn spawn_label(&self, n: u32, views: u32, shard_size: u64) -> (Proc, PathBuf) {
        let args = self.label_args(views, shard_size);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.data.path(&format!("label-{n}.json"));
        let proc =
            Proc::spawn(&format!("label #{n}"), &args, self.data.path(&format!("label-{n}.log")), Some(&out));
        (proc, out)
    }

    /// Runs `distillery label` to its end and returns its JSON result.
    fn label(&self, n: u32, views: u32, shard_size: u64) -> Value {
        let (mut proc, out) = self.spawn_label(n, views, shard_size);
        let status = proc.wait(DEADLINE);
        label_result(&proc, status, &out)
    }

    /// Reads the cache back and checks exactly one row per (face, view) of the faces dataset for
    /// the teacher `fingerprint`; returns the number of rows of the cache.
    fn assert_exactly_once(&self, fingerprint: &str, views: u32) -> u64 {
        let fp = TeacherFingerprint::parse(fingerprint).expect("teacher fingerprint");
        let (ids, rows) = self.rt.block_on(async {
            let faces = FaceStore::open(&self.data.faces).await.expect("open faces");
            let cache = TeacherCache::open(&self.data.cache).await.expect("open cache");
            (faces.ids().await.expect("face ids"), cache.rows(&fp).await.expect("cache rows"))
        });
        assert_eq!(ids.len() as u64, self.data.count);
        let mut seen: HashMap<(String, u32), u32> = HashMap::new();
        for r in &rows {
            *seen.entry((r.face_id.to_string(), r.view.index)).or_default() += 1;
            assert!(r.logits.iter().all(|v| v.is_finite()), "non-finite logits for {}", r.face_id);
        }
        let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(dupes.is_empty(), "duplicated (face, view) rows, e.g. {dupes:?}");
        let missing: Vec<_> = ids
            .iter()
            .flat_map(|id| (0..=views).map(move |v| (id.to_string(), v)))
            .filter(|k| !seen.contains_key(k))
            .take(5)
            .collect();
        assert!(missing.is_empty(), "(face, view) pairs without a row, e.g. {missing:?}");
        let expected = self.data.count * (u64::from(views) + 1);
        assert_eq!(rows.len() as u64, expected, "rows of teacher {fingerprint}");
        // `cache inspect` counts the same rows in all: none of any other teacher.
        let inspect = run_json(&["cache", "inspect", &self.data.cache, "--format", "json"]);
        assert_eq!(inspect["rows"].as_u64(), Some(expected), "{inspect}");
        expected
    }

    fn cache_version(&self) -> u64 {
        self.rt.block_on(async { TeacherCache::open(&self.data.cache).await.expect("open cache").version() })
    }
}

/// Starts `serve coordinator` on `listen` and waits for the address it writes to its state
/// directory (removed first, so an old one is never read).
fn spawn_coordinator(
    data: &Data,
    listen: SocketAddr,
    metrics: SocketAddr,
    lease_ttl: &str,
    generation: u32,
    tls: bool,
) -> (Proc, SocketAddr) {
    let state = data.path("coordinator-state");
    std::fs::create_dir_all(&state).unwrap();
    let addr_file = state.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    let (l, m) = (listen.to_string(), metrics.to_string());
    let mut args: Vec<String> =
        ["serve", "coordinator", "--state-dir", path_str(&state), "--listen", &l, "--metrics-listen", &m]
            .iter()
            .map(|s| s.to_string())
            .chain(["--lease-ttl".to_owned(), lease_ttl.to_owned()])
            .collect();
    if tls {
        args.extend(server_tls_args());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = Proc::spawn(
        &format!("coordinator #{generation}"),
        &args,
        data.path(&format!("coordinator-{generation}.log")),
        None,
    );
    let addr = wait_for("coordinator.addr", DEADLINE, || {
        if let Some(s) = proc.exited() {
            panic!("coordinator exited early ({s}):\n{}", proc.log_tail(40));
        }
        let text = std::fs::read_to_string(&addr_file).ok()?;
        // Written in one go with a trailing newline: without it the write is not finished.
        text.strip_suffix('\n')?.parse::<SocketAddr>().ok()
    });
    (proc, addr)
}

/// Parses the JSON `distillery label` printed, after checking it succeeded.
fn label_result(proc: &Proc, status: ExitStatus, out: &Path) -> Value {
    let stdout = std::fs::read_to_string(out).unwrap_or_default();
    assert!(status.success(), "{} failed ({status}):\n{stdout}\n{}", proc.name, proc.log_tail(40));
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{}: stdout is not JSON ({e}):\n{stdout}", proc.name))
}

// The generated client's type names tonic's `Channel`, which this crate does not depend on:
// every call connects afresh (cheap on loopback; TLS when the target is `https://`) and the client
// type stays inferred.

async fn get_job(target: Target, job_id: String) -> Result<v1::Job, String> {
    let ch = target.connect(Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
    let mut c = CoordinatorServiceClient::new(ch);
    c.get_job(v1::GetJobRequest { job_id }).await.map(|r| r.into_inner()).map_err(|s| s.to_string())
}

async fn list_jobs(target: Target) -> Result<Vec<v1::Job>, String> {
    let ch = target.connect(Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
    let mut c = CoordinatorServiceClient::new(ch);
    let r = c.list_jobs(v1::ListJobsRequest::default()).await.map_err(|s| s.to_string())?;
    Ok(r.into_inner().jobs)
}

async fn submit(target: Target, spec: v1::LabelJobSpec) -> Result<v1::SubmitLabelJobResponse, String> {
    let ch = target.connect(Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
    let mut c = CoordinatorServiceClient::new(ch);
    let req = v1::SubmitLabelJobRequest { spec: Some(spec) };
    c.submit_label_job(req).await.map(|r| r.into_inner()).map_err(|s| s.to_string())
}

fn shards(job: &v1::Job) -> v1::ShardCounts {
    job.shards.unwrap_or_default()
}

// ----- tests ------------------------------------------------------------------------------------

/// Three workers label every (face, view) once: the cache holds exactly one row for each, every
/// shard was committed once, and the workers handed in exactly one completion per shard.
#[test]
fn three_workers_label_every_face_view_exactly_once() {
    let _serial = serial();
    let t0 = Instant::now();
    let data = Data::new(400);
    let c = Cluster::start(data, 3, "10s");
    let (views, shard_size) = (3, 50);

    let out = c.label(1, views, shard_size);
    let expected_rows = 400 * (u64::from(views) + 1);
    assert_eq!(out["images_total"].as_u64(), Some(400), "{out}");
    assert_eq!(out["images_done"].as_u64(), Some(400), "{out}");
    assert_eq!(out["images_skipped"].as_u64(), Some(0), "{out}");
    assert_eq!(out["rows_written"].as_u64(), Some(expected_rows), "{out}");
    assert_eq!(out["poisoned"].as_array().map(Vec::len), Some(0), "{out}");

    let job = c.get_job(out["job_id"].as_str().unwrap());
    assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
    let s = shards(&job);
    assert!(s.total >= 8, "expected at least 8 shards of {shard_size}: {s:?}");
    assert_eq!((s.committed, s.skipped, s.poisoned, s.pending, s.leased), (s.total, 0, 0, 0, 0));
    let fp = out["teacher_fingerprint"].as_str().unwrap();
    assert_eq!(job.teacher_fingerprint, fp);

    c.assert_exactly_once(fp, views);
    let inspect = run_json(&["cache", "inspect", &c.data.cache, "--format", "json"]);
    assert_eq!(inspect["shards"].as_u64(), Some(s.total), "one committed shard key per shard: {inspect}");

    // Each shard was leased, labelled and committed once: no lease lapsed, no work was redone.
    let m = c.coordinator_metrics();
    assert_eq!(must(&m, "distillery_coordinator_leases_granted_total"), s.total as f64, "{m}");
    assert_eq!(must(&m, "distillery_coordinator_completions_total{state=\"committed\"}"), s.total as f64);
    assert_eq!(series(&m, "distillery_coordinator_leases_expired_total").unwrap_or(0.0), 0.0, "{m}");
    assert_eq!(c.workers_total("distillery_teacher_shards_completed_total"), s.total as f64);
    assert_eq!(c.workers_total("distillery_teacher_images_total"), expected_rows as f64);
    println!("three workers, {} shards: {:.1}s", s.total, t0.elapsed().as_secs_f64());
}

/// A worker killed with SIGKILL while it labels a shard: its lease lapses, another worker labels
/// the shard again, and the cache still holds exactly one row per (face, view).
#[test]
fn a_worker_killed_mid_shard_loses_nothing_and_duplicates_nothing() {
    let _serial = serial();
    let t0 = Instant::now();
    let data = Data::new(800);
    let mut c = Cluster::start(data, 3, "3s");
    let (views, shard_size) = (3, 40);
    let (mut label, out) = c.spawn_label(1, views, shard_size);

    // A worker with images in its pipeline is inside `label_shard`, which runs only under a lease.
    let victim = wait_for("a worker in the middle of a shard", DEADLINE, || {
        if let Some(s) = label.exited() {
            panic!("label ended ({s}) before any worker was seen mid-shard: make the job bigger");
        }
        (0..c.workers.len()).find(|&i| {
            c.worker_metrics(i)
                .and_then(|m| series(&m, "distillery_teacher_queue_depth{stage=\"in_flight\"}"))
                .is_some_and(|v| v > 0.0)
        })
    });
    c.workers[victim].proc.kill();
    println!("killed worker w{victim} mid-shard after {:.1}s", t0.elapsed().as_secs_f64());

    let status = label.wait(DEADLINE);
    let result = label_result(&label, status, &out);
    let expected_rows = 800 * (u64::from(views) + 1);
    assert_eq!(result["rows_written"].as_u64(), Some(expected_rows), "{result}");
    assert_eq!(result["images_done"].as_u64(), Some(800), "{result}");
    assert_eq!(result["poisoned"].as_array().map(Vec::len), Some(0), "{result}");
    let job = c.get_job(result["job_id"].as_str().unwrap());
    assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
    let s = shards(&job);
    assert_eq!((s.committed, s.poisoned), (s.total, 0), "{s:?}");

    // The victim's lease lapsed and its shard was leased again; every shard was committed once.
    let m = c.coordinator_metrics();
    assert!(must(&m, "distillery_coordinator_leases_expired_total") >= 1.0, "{m}");
    assert!(must(&m, "distillery_coordinator_leases_granted_total") > s.total as f64, "{m}");
    assert_eq!(must(&m, "distillery_coordinator_completions_total{state=\"committed\"}"), s.total as f64);
    c.assert_exactly_once(result["teacher_fingerprint"].as_str().unwrap(), views);
    let inspect = run_json(&["cache", "inspect", &c.data.cache, "--format", "json"]);
    assert_eq!(inspect["shards"].as_u64(), Some(s.total), "{inspect}");
    println!("worker kill: {:.1}s", t0.elapsed().as_secs_f64());
}

/// The coordinator killed with SIGKILL mid-job and started again on the same state directory: the
/// job resumes and completes, shards committed before the kill are not leased again, and the
/// cache holds exactly one row per (face, view).
#[test]
fn a_coordinator_killed_and_restarted_mid_job_resumes_without_recomputing() {
    let _serial = serial();
    let t0 = Instant::now();
    let data = Data::new(800);
    let mut c = Cluster::start(data, 3, "5s");
    let (views, shard_size) = (3, 40);
    let submitted = c.submit(c.spec(views, shard_size));
    let job = submitted.job.expect("job");
    assert!(!submitted.already_active);
    let total = shards(&job).total;
    assert!(total >= 16, "expected at least 16 shards: {:?}", job.shards);

    let before = wait_for("a few committed shards", DEADLINE, || {
        let j = c.get_job(&job.job_id);
        assert!(!is_terminal(j.state), "the job ended before the kill: make it bigger ({j:?})");
        (shards(&j).committed >= 3).then_some(shards(&j).committed)
    });
    c.kill_and_restart_coordinator();
    println!("coordinator killed after {before}/{total} commits, {:.1}s", t0.elapsed().as_secs_f64());

    // The job and its committed shards survived the crash.
    let after = c.get_job(&job.job_id);
    assert!(shards(&after).committed >= before, "lost commits: {before} before, {:?} after", after.shards);
    assert_eq!(after.job_fingerprint, job.job_fingerprint);

    let done = c.wait_job(&job.job_id);
    assert_eq!(done.state, v1::JobState::Completed as i32, "{done:?}");
    let s = shards(&done);
    assert_eq!((s.committed, s.poisoned, s.total), (total, 0, total), "{s:?}");
    assert_eq!(done.images_done, 800);

    // The new coordinator leased only shards not committed before the kill (some in flight at the
    // kill may be redone), and never one that was.
    let m = c.coordinator_metrics();
    let granted = must(&m, "distillery_coordinator_leases_granted_total");
    assert!(granted >= 1.0, "the restarted coordinator leased nothing: {m}");
    assert!(
        granted <= (total - before) as f64,
        "{granted} leases after the restart, {before}/{total} committed before"
    );
    let commits = must(&m, "distillery_coordinator_completions_total{state=\"committed\"}");
    assert!((1.0..=granted).contains(&commits), "{commits} commits from {granted} leases");
    c.assert_exactly_once(&done.teacher_fingerprint, views);
    let inspect = run_json(&["cache", "inspect", &c.data.cache, "--format", "json"]);
    assert_eq!(inspect["shards"].as_u64(), Some(total), "{inspect}");
    println!("coordinator restart: {:.1}s", t0.elapsed().as_secs_f64());
}

/// Labelling the same faces with the same teacher again does no teacher work: an identical job
/// finds its shards committed, a job that names the teacher's fingerprint skips every shard
/// without leasing one, and a job with other shards is handed only faces already in the cache.
#[test]
fn a_second_job_with_the_same_teacher_does_no_teacher_work() {
    let _serial = serial();
    let t0 = Instant::now();
    let data = Data::new(400);
    let c = Cluster::start(data, 3, "10s");
    let views = 1;
    let first = c.label(1, views, 50);
    let fp = first["teacher_fingerprint"].as_str().unwrap().to_owned();
    let rows = c.assert_exactly_once(&fp, views);
    assert_eq!(first["rows_written"].as_u64(), Some(rows));

    let leases = || must(&c.coordinator_metrics(), "distillery_coordinator_leases_granted_total");
    let teacher_rows = || c.workers_total("distillery_teacher_images_total");
    let (leases0, teacher_rows0, version0) = (leases(), teacher_rows(), c.cache_version());
    assert_eq!(teacher_rows0, rows as f64);

    // 1. The identical job: every shard key is already committed in the cache.
    let again = c.label(2, views, 50);
    assert_ne!(again["job_id"], first["job_id"], "a finished job is not reused");
    assert_eq!(again["rows_written"].as_u64(), Some(0), "{again}");
    assert_eq!(again["images_done"].as_u64(), Some(400), "{again}");
    let j = c.get_job(again["job_id"].as_str().unwrap());
    assert_eq!(j.state, v1::JobState::Completed as i32, "{j:?}");
    assert_eq!(shards(&j).committed + shards(&j).skipped, shards(&j).total, "{j:?}");
    assert_eq!(leases(), leases0, "the identical job leased shards");

    // 2. Other shards, teacher fingerprint given: every shard is skipped at submission.
    let mut spec = c.spec(views, 30);
    spec.teacher.as_mut().unwrap().fingerprint = fp.clone();
    let r = c.submit(spec);
    let j = r.job.expect("job");
    assert!(!r.already_active);
    assert_eq!(j.state, v1::JobState::Completed as i32, "{j:?}");
    let s = shards(&j);
    assert_eq!((s.skipped, s.committed, s.total > 0), (s.total, 0, true), "{s:?}");
    assert_eq!((j.images_skipped, j.images_total, j.rows_written), (400, 400, 0), "{j:?}");
    assert_eq!(leases(), leases0, "the skipped job leased shards");

    // 3. Other shards, fingerprint unknown to the submitter: the job binds to the first worker's
    //    teacher; whatever is leased, the workers find every (face, view) in the cache.
    let third = c.label(3, views, 70);
    assert_eq!(third["rows_written"].as_u64(), Some(0), "{third}");
    assert_eq!(third["images_skipped"].as_u64(), Some(400), "{third}");
    assert_eq!(third["teacher_fingerprint"].as_str(), Some(fp.as_str()));

    assert_eq!(teacher_rows(), teacher_rows0, "the teacher ran again");
    assert_eq!(c.assert_exactly_once(&fp, views), rows);
    assert!(c.cache_version() >= version0);
    println!("second jobs: {:.1}s", t0.elapsed().as_secs_f64());
}

/// A Python grpcio client (stubs generated from proto/ at run time) submits a job to a real
/// coordinator, follows WatchJob to the end and reports the completed job.
#[test]
fn python_grpcio_client_submits_and_watches_a_job() {
    let python = std::env::var("DISTILLERY_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import grpc, grpc_tools.protoc"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIPPED: {python} lacks grpcio/grpcio-tools ({}); set DISTILLERY_PYTHON to a Python that has them",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            );
            return;
        }
        Err(e) => {
            println!("SKIPPED: cannot run {python} ({e}); set DISTILLERY_PYTHON");
            return;
        }
    }
    let _serial = serial();
    let t0 = Instant::now();
    let data = Data::new(200);
    let c = Cluster::start(data, 1, "10s");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("tests/python/client.py");
    let views = 1;
    let args = [
        path_str(&script).to_owned(),
        "--coordinator".into(),
        c.addr.to_string(),
        "--faces".into(),
        c.data.faces.clone(),
        "--cache".into(),
        c.data.cache.clone(),
        "--teacher-kind".into(),
        "student".into(),
        "--teacher-path".into(),
        c.data.teacher.clone(),
        "--views".into(),
        views.to_string(),
        "--shard-size".into(),
        "50".into(),
        "--proto-root".into(),
        path_str(&root.join("proto")).to_owned(),
        "--timeout".into(),
        DEADLINE.as_secs().to_string(),
    ];
    let stdout_path = c.data.path("python.out");
    let log = c.data.path("python.log");
    let mut py = Command::new(&python)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).unwrap())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("spawn python");
    let status = wait_for("the Python client to exit", DEADLINE + Duration::from_secs(30), || {
        py.try_wait().expect("try_wait")
    });
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "client.py failed ({status}):\n{stdout}\n{stderr}");
    let line = stdout.lines().last().unwrap_or_else(|| panic!("no output:\n{stderr}"));
    let out: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    println!("{out}");
    assert_eq!(out["state"], "JOB_STATE_COMPLETED", "{out}");
    assert_eq!(out["already_active"], false, "{out}");
    assert_eq!(out["images_total"].as_u64(), Some(200), "{out}");
    assert_eq!(out["images_done"].as_u64(), Some(200), "{out}");
    assert_eq!(out["rows_written"].as_u64(), Some(200 * (views as u64 + 1)), "{out}");
    let total = out["shards"]["total"].as_u64().unwrap();
    assert!(total >= 4, "{out}");
    assert_eq!(out["shards"]["committed"].as_u64(), Some(total), "{out}");
    // A snapshot first, then at least the final state change.
    assert_eq!(out["event_kinds"]["JOB_EVENT_KIND_SNAPSHOT"].as_u64(), Some(1), "{out}");
    assert!(out["event_kinds"]["JOB_EVENT_KIND_STATE_CHANGED"].as_u64() >= Some(1), "{out}");

    // The coordinator agrees, and the cache holds what the job reported.
    let job = c.get_job(out["job_id"].as_str().unwrap());
    assert_eq!(job.state, v1::JobState::Completed as i32);
    assert_eq!(job.teacher_fingerprint, out["teacher_fingerprint"].as_str().unwrap());
    c.assert_exactly_once(&job.teacher_fingerprint, views);
    println!("python client: {:.1}s", t0.elapsed().as_secs_f64());
}

/// TLS between every component, through the CLI: `serve coordinator --tls-cert --tls-key`, a worker
/// (`serve teacher`) that dials it with `--tls-ca` and serves its own TeacherService with
/// `--tls-cert --tls-key`, and `label --coordinator https://localhost:PORT --tls-ca` labelling every
/// face once. `label` without a CA or trusting another CA fails, saying why, and submits nothing.
/// Then `serve trainer` over TLS runs what `train --trainer https://... --tls-ca` submits.
#[test]
fn tls_between_every_component() {
    let _serial = serial();
    let t0 = Instant::now();
    let data = Data::new(60);
    let c = Cluster::start_with(data, 1, "10s", true);
    assert!(c.url().starts_with("https://localhost:"), "{}", c.url());

    let out = c.label(1, 1, 20);
    assert_eq!(out["images_done"].as_u64(), Some(60), "{out}");
    assert_eq!(out["rows_written"].as_u64(), Some(120), "{out}");
    assert_eq!(out["poisoned"].as_array().map(Vec::len), Some(0), "{out}");
    c.assert_exactly_once(out["teacher_fingerprint"].as_str().unwrap(), 1);

    // The worker's TeacherService answers over TLS, to a client trusting the CA.
    let worker = c.workers[0].grpc.expect("the TLS worker's address");
    let info = c.rt.block_on(async {
        let ch = Target::new(format!("https://localhost:{}", worker.port()))
            .with_tls_ca(Some(tls_fixture("ca.pem").into()))
            .connect(Duration::from_secs(10))
            .await
            .expect("dial the worker over TLS");
        let mut client = v1::teacher_service_client::TeacherServiceClient::new(ch);
        client.model_info(v1::ModelInfoRequest {}).await.expect("ModelInfo over TLS").into_inner()
    });
    assert_eq!(info.fingerprint, out["teacher_fingerprint"].as_str().unwrap(), "{info:?}");

    // Clients without the right CA are refused before any gRPC call, with the reason.
    let jobs_before = c.rt.block_on(list_jobs(c.target())).unwrap().len();
    let args = c.label_args(1, 20);
    let ca_flag = args.iter().position(|a| a == "--tls-ca").expect("label gets --tls-ca");
    for (ca, expect) in [(None, "no CA certificate"), (Some("other-ca.pem"), "invalid peer certificate")] {
        let mut a = args.clone();
        match ca {
            Some(name) => a[ca_flag + 1] = tls_fixture(name),
            None => {
                a.remove(ca_flag);
                a.remove(ca_flag);
            }
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = distillery(&a).env_remove("DISTILLERY_TLS_CA").output().expect("spawn label");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "label with CA {ca:?}:\n{stderr}");
        assert!(stderr.contains(expect), "label with CA {ca:?} should say `{expect}`:\n{stderr}");
    }
    assert_eq!(
        c.rt.block_on(list_jobs(c.target())).unwrap().len(),
        jobs_before,
        "a refused client submitted"
    );

    // The trainer over TLS, with `train --trainer` as its client.
    let trainer_addr = free_addr();
    let state = c.data.path("trainer-state");
    let mut trainer_args: Vec<String> = [
        "serve",
        "trainer",
        "--listen",
        &trainer_addr.to_string(),
        "--state-dir",
        path_str(&state),
        "--no-plots",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    trainer_args.extend(server_tls_args());
    let trainer_args: Vec<&str> = trainer_args.iter().map(String::as_str).collect();
    let mut trainer = Proc::spawn("trainer", &trainer_args, c.data.path("trainer.log"), None);
    let trainer_url = format!("https://localhost:{}", trainer_addr.port());
    let trainer_target = Target::new(trainer_url.as_str()).with_tls_ca(Some(tls_fixture("ca.pem").into()));
    wait_for("the trainer to accept TLS connections", DEADLINE, || {
        if let Some(s) = trainer.exited() {
            panic!("trainer exited early ({s}):\n{}", trainer.log_tail(40));
        }
        c.rt.block_on(trainer_target.connect(Duration::from_secs(2))).ok()
    });
    let student = format!("tiny@{SIDE}");
    let ca = tls_fixture("ca.pem");
    let stdout = run_ok(&[
        "train",
        "--trainer",
        &trainer_url,
        "--tls-ca",
        &ca,
        "--faces",
        &c.data.faces,
        "--student",
        &student,
        "--set",
        "optim.steps=2",
        "--set",
        "data.batch_size=16",
        "--no-progress",
    ]);
    assert!(stdout.contains("submitted run"), "{stdout}");
    assert!(stdout.contains(": Completed"), "the run did not complete:\n{stdout}");
    println!("TLS cluster and trainer: {:.1}s", t0.elapsed().as_secs_f64());
}
