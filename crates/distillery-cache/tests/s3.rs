//! Faces dataset and teacher cache on an S3-compatible server (moto) started on loopback.
//! Skips with a message when moto is not installed (`./dev test` installs it in a cached venv).
#![allow(clippy::print_stdout)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use distillery_cache::{CacheOptions, CommitOutcome, FaceStore, StorageOptions, TeacherCache};
use distillery_data::views_for;

/// Kills the server when the test ends, whatever happens.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `$DISTILLERY_PYTHON` (set by `./dev test` to a venv with moto) or `python3`.
fn python() -> String {
    std::env::var("DISTILLERY_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn moto_available() -> bool {
    Command::new(python())
        .args(["-c", "import moto.server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start_moto() -> (Server, u16) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(python())
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn moto");
    let server = Server(child);
    // Readiness: the port accepts connections (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto did not listen on {port} within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, port)
}

/// Creates a bucket with a plain HTTP PUT (moto accepts unsigned requests).
fn create_bucket(port: u16, bucket: &str) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faces_and_cache_on_s3() {
    if !moto_available() {
        println!("SKIPPED: moto is not installed (pip install 'moto[server]')");
        return;
    }
    let (_server, port) = tokio::task::spawn_blocking(start_moto).await.unwrap();
    tokio::task::spawn_blocking(move || create_bucket(port, "distillery")).await.unwrap();
    let opts: StorageOptions = [
        ("aws_endpoint", format!("http://127.0.0.1:{port}")),
        ("aws_access_key_id", "testing".into()),
        ("aws_secret_access_key", "testing".into()),
        ("aws_region", "us-east-1".into()),
        ("allow_http", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let furi = "s3://distillery/run/faces.lance";
    let mut store = FaceStore::create_or_open_with(furi, opts.clone()).await.unwrap();
    assert_eq!(store.append(faces(0..6)).await.unwrap().added, 6);
    assert_eq!(store.append(faces(3..9)).await.unwrap().added, 3);
    let store = FaceStore::open_with(furi, opts.clone()).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 9);
    let shards = store.shards(4).await.unwrap();
    let mut n = 0;
    for s in &shards {
        n += store.read_shard(s).await.unwrap().len();
    }
    assert_eq!(n, 9);

    let curi = "s3://distillery/run/cache.lance";
    let copts = CacheOptions { storage: opts.clone(), ..Default::default() };
    let mut cache = TeacherCache::create_or_open(curi, copts).await.unwrap();
    let m = meta(1);
    let rows: Vec<_> = faces(0..9)
        .iter()
        .flat_map(|f| views_for(&f.id, 1, 0).into_iter().map(|v| row(&f.id, v)).collect::<Vec<_>>())
        .collect();
    let staged = cache.stage(&m, "s3-shard", "w", rows.clone()).await.unwrap();
    assert!(matches!(
        cache.commit("s3-shard", staged.clone()).await.unwrap(),
        CommitOutcome::Committed { .. }
    ));
    assert_eq!(cache.commit("s3-shard", staged).await.unwrap(), CommitOutcome::AlreadyCommitted);
    let cache = TeacherCache::open_with(curi, opts).await.unwrap();
    assert_eq!(cache.rows(&m.fingerprint).await.unwrap(), rows);
}
