//! The trainer service over real TCP: submit, watch, get, list, cancel, and the registry surviving
//! a restart.

mod common;

use std::time::Duration;

use distillery_proto::v1;
use distillery_proto::v1::trainer_service_client::TrainerServiceClient;
use distillery_trainer::service::{ServiceConfig, Trainer};
use tonic::transport::Channel;

async fn start(state: &std::path::Path) -> TrainerServiceClient<Channel> {
    let mut cfg = ServiceConfig::new(state);
    cfg.plots = false;
    let trainer = Trainer::open(cfg).await.unwrap();
    let (addr, _h) = trainer.spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    TrainerServiceClient::connect(format!("http://{addr}")).await.unwrap()
}

/// Follows a run until its stream ends; returns the events.
async fn watch(client: &mut TrainerServiceClient<Channel>, id: &str) -> Vec<v1::RunEvent> {
    let mut s = client.watch_run(v1::WatchRunRequest { run_id: id.into() }).await.unwrap().into_inner();
    let mut out = vec![];
    // Generous bound: a hung stream fails the test instead of hanging CI.
    while let Some(ev) =
        tokio::time::timeout(Duration::from_secs(120), s.message()).await.expect("watch stalled").unwrap()
    {
        out.push(ev);
    }
    out
}

fn state(r: &v1::Run) -> v1::RunState {
    v1::RunState::try_from(r.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_trained_watched_listed_cancelled_and_remembered() {
    let tmp = tempfile::tempdir().unwrap();
    let (faces, cache) = common::datasets(tmp.path(), 48).await;
    let state_dir = tmp.path().join("state");
    let mut client = start(&state_dir).await;

    let bad = client
        .submit_run(v1::SubmitRunRequest { config_toml: "[optim]\nlr = -1.0\n".into(), overrides: vec![] })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("optim.lr"), "{}", bad.message());
    let unknown = client.get_run(v1::GetRunRequest { run_id: "nope".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let run = client
        .submit_run(v1::SubmitRunRequest {
            config_toml: common::config_toml(&faces, Some(&cache), 6),
            overrides: vec!["optim.lr=0.002".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(run.config_toml.contains("lr = 0.002"), "{}", run.config_toml);
    let events = watch(&mut client, &run.run_id).await;
    assert_eq!(events[0].kind, v1::RunEventKind::Snapshot as i32);
    let metric_steps: Vec<u64> =
        events.iter().filter(|e| e.kind == v1::RunEventKind::Metrics as i32).map(|e| e.step).collect();
    assert!(!metric_steps.is_empty(), "no metrics streamed: {events:?}");
    assert!(metric_steps.windows(2).all(|w| w[0] < w[1]));
    let last = events.last().unwrap().run.clone().unwrap();
    assert_eq!(state(&last), v1::RunState::Completed, "{}", last.error);

    let got = client.get_run(v1::GetRunRequest { run_id: run.run_id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.step, 6);
    let names: Vec<&str> = got.latest_metrics.iter().map(|m| m.name.as_str()).collect();
    assert!(names.contains(&"val/accuracy") && names.contains(&"val/teacher_top1_agreement"), "{names:?}");
    assert!(std::path::Path::new(&got.run_dir).join("model.safetensors").is_file());

    // A long run, cancelled while it trains.
    let long = client
        .submit_run(v1::SubmitRunRequest {
            config_toml: common::config_toml(&faces, None, 100_000),
            overrides: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut s =
        client.watch_run(v1::WatchRunRequest { run_id: long.run_id.clone() }).await.unwrap().into_inner();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), s.message()).await.unwrap().unwrap().unwrap();
        if ev.kind == v1::RunEventKind::Metrics as i32 {
            break;
        }
    }
    client
        .cancel_run(v1::CancelRunRequest { run_id: long.run_id.clone(), reason: "enough".into() })
        .await
        .unwrap();
    let mut end = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(120), s.message()).await.unwrap().unwrap() {
        end = ev.run;
    }
    let end = end.unwrap();
    assert_eq!(state(&end), v1::RunState::Cancelled);
    assert_eq!(end.error, "enough");
    let again =
        client.cancel_run(v1::CancelRunRequest { run_id: long.run_id.clone(), reason: String::new() }).await;
    assert_eq!(again.unwrap_err().code(), tonic::Code::FailedPrecondition);

    let listed = client.list_runs(v1::ListRunsRequest::default()).await.unwrap().into_inner().runs;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].run_id, long.run_id, "newest first");
    let done_only = client
        .list_runs(v1::ListRunsRequest { states: vec![v1::RunState::Completed as i32], limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(done_only.len(), 1);

    // A new service on the same state directory knows both runs and their final metrics.
    let mut client2 = start(&state_dir).await;
    let listed = client2.list_runs(v1::ListRunsRequest::default()).await.unwrap().into_inner().runs;
    assert_eq!(listed.len(), 2);
    let first = listed.iter().find(|r| r.run_id == run.run_id).unwrap();
    assert_eq!(state(first), v1::RunState::Completed);
    assert!(first.latest_metrics.iter().any(|m| m.name == "val/accuracy"));
    let reg = distillery_trainer::registry::Registry::new(&state_dir);
    let rec = reg.latest().await.unwrap().into_iter().find(|r| r.run_id == run.run_id).unwrap();
    assert_eq!(rec.teacher.as_deref(), Some(common::meta().fingerprint.as_str()));
    assert!(rec.cache_version.is_some());
}
