//! `distillery serve trainer` in process, over real TCP on 127.0.0.1: health and reflection answer
//! without a token, `TrainerService` refuses calls without it, the client helper sends it, and
//! shutdown reports NOT_SERVING and ends open `WatchRun` streams.

use std::time::Duration;

use distillery_proto::transport::Target;
use distillery_proto::v1;
use distillery_proto::v1::trainer_service_client::TrainerServiceClient;
use distillery_trainer::server::{SERVICE_NAME, TrainerServerConfig, connect, spawn};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TOKEN: &str = "trainer-token-42";
const GUARD: Duration = Duration::from_secs(60);

fn config(state: &std::path::Path) -> TrainerServerConfig {
    let mut cfg = TrainerServerConfig::new(state);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.plots = false;
    cfg.auth_token = Some(TOKEN.into());
    cfg
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

async fn health(ch: &Channel, service: &str) -> ServingStatus {
    HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
        .await
        .unwrap_or_else(|e| panic!("health {service:?} without a token: {e}"))
        .into_inner()
        .status()
}

#[tokio::test]
async fn health_is_open_and_the_trainer_service_needs_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let running = spawn(config(tmp.path())).await.unwrap();
    let ch = channel(running.addr).await;
    assert_eq!(health(&ch, "").await, ServingStatus::Serving);
    assert_eq!(health(&ch, SERVICE_NAME).await, ServingStatus::Serving);

    // No token, or a wrong one: refused before the request is looked at.
    let mut anon = TrainerServiceClient::new(ch.clone());
    let e = anon.submit_run(v1::SubmitRunRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = anon.list_runs(v1::ListRunsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let mut wrong = connect(&Target::new(format!("http://{}", running.addr)), Some("nope")).await.unwrap();
    let e = wrong.list_runs(v1::ListRunsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // With the token the call reaches the service (which then judges the request).
    let mut ok = connect(&Target::new(format!("http://{}", running.addr)), Some(TOKEN)).await.unwrap();
    let e = ok
        .submit_run(v1::SubmitRunRequest { config_toml: "[optim]\nlr = -1.0\n".into(), overrides: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(ok.list_runs(v1::ListRunsRequest::default()).await.unwrap().into_inner().runs.is_empty());

    tokio::time::timeout(GUARD, running.shutdown()).await.expect("shutdown hung").unwrap();
}

#[tokio::test]
async fn reflection_answers_without_the_token() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let tmp = tempfile::tempdir().unwrap();
    let running = spawn(config(tmp.path())).await.unwrap();
    let mut client = ServerReflectionClient::new(channel(running.addr).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == SERVICE_NAME), "{names:?}");
    assert!(names.iter().any(|n| n == "grpc.health.v1.Health"), "{names:?}");
    running.shutdown().await.unwrap();
}

/// Once the service stops (the first step of a graceful shutdown) it takes no new run, and the
/// server then stops promptly; the next server on the same state directory serves again.
#[tokio::test]
async fn a_stopping_trainer_refuses_new_runs_and_a_restart_serves_again() {
    let tmp = tempfile::tempdir().unwrap();
    let running = spawn(config(tmp.path())).await.unwrap();
    let mut ok = connect(&Target::new(format!("http://{}", running.addr)), Some(TOKEN)).await.unwrap();
    tokio::time::timeout(GUARD, running.trainer.stop()).await.expect("stop hung");
    assert!(running.trainer.is_stopping());
    let e = ok.submit_run(v1::SubmitRunRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    tokio::time::timeout(GUARD, running.shutdown()).await.expect("shutdown hung").unwrap();

    let again = spawn(config(tmp.path())).await.unwrap();
    assert_eq!(health(&channel(again.addr).await, "").await, ServingStatus::Serving);
    again.shutdown().await.unwrap();
}

fn tls_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tls").join(name)
}

/// A trainer serving TLS (`[tls]`): the client helper with the CA that signed the certificate
/// reaches `TrainerService` (by DNS name and by IP); one trusting another CA, or given no CA for an
/// `https://` URL, is refused with an error that says why.
#[tokio::test]
async fn a_tls_trainer_answers_clients_with_the_ca_only() {
    use distillery_proto::transport::TlsPaths;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.tls = Some(TlsPaths { cert: tls_fixture("server.pem"), key: tls_fixture("server.key") });
    let running = spawn(cfg).await.unwrap();
    let port = running.addr.port();
    for host in ["localhost", "127.0.0.1"] {
        let trainer = Target::new(format!("https://{host}:{port}")).with_tls_ca(Some(tls_fixture("ca.pem")));
        let mut ok = connect(&trainer, Some(TOKEN)).await.unwrap();
        let runs = ok.list_runs(v1::ListRunsRequest::default()).await.unwrap().into_inner().runs;
        assert!(runs.is_empty(), "{runs:?}");
    }

    let wrong =
        Target::new(format!("https://localhost:{port}")).with_tls_ca(Some(tls_fixture("other-ca.pem")));
    let e =
        connect(&wrong, Some(TOKEN)).await.expect_err("a client trusting another CA got through").to_string();
    assert!(e.contains("invalid peer certificate") && e.contains(&format!("localhost:{port}")), "{e}");
    let no_ca = Target::new(format!("https://localhost:{port}"));
    let e = connect(&no_ca, Some(TOKEN)).await.expect_err("an https:// client without a CA").to_string();
    assert!(e.contains("`tls_ca`") && e.contains("no CA certificate"), "{e}");
    tokio::time::timeout(GUARD, running.shutdown()).await.expect("shutdown hung").unwrap();
}
