//! `TeacherService` over real TCP on 127.0.0.1: health before and after loading, auth, `Infer` with
//! images and tensors, `InferStream`, `ModelInfo` and reflection.

use std::net::SocketAddr;
use std::sync::Arc;

use candle_core::Device;
use distillery_models::teacher::Teacher;
use distillery_proto::v1;
use distillery_proto::v1::teacher_service_client::TeacherServiceClient;
use distillery_teacher::prep::prepare_views;
use distillery_teacher::service::{SERVICE_NAME, ServerOptions, TeacherServerHandle, serve};
use distillery_teacher::{Engine, TinyTeacher};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TOKEN: &str = "s3cret-token";

async fn start(token: Option<&str>) -> (TeacherServerHandle, oneshot::Sender<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let opts = ServerOptions { auth_token: token.map(str::to_string), max_message_bytes: 4 << 20, tls: None };
    let h = serve(SocketAddr::from(([127, 0, 0, 1], 0)), opts, async {
        let _ = rx.await;
    })
    .await
    .unwrap();
    (h, tx)
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

fn png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(10, 10, |x, y| {
        image::Rgb([seed.wrapping_mul(x as u8), (y * 20) as u8, 100])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

async fn health(ch: &Channel, service: &str) -> ServingStatus {
    let r = HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
        .await
        .unwrap();
    r.into_inner().status()
}

fn tiny() -> Arc<TinyTeacher> {
    Arc::new(TinyTeacher::new(11, 8, &Device::Cpu).unwrap())
}

#[tokio::test]
async fn health_goes_from_not_serving_to_serving_when_a_teacher_loads() {
    let (h, stop) = start(Some(TOKEN)).await;
    let ch = channel(h.addr).await;
    assert_eq!(health(&ch, SERVICE_NAME).await, ServingStatus::NotServing);
    assert_eq!(health(&ch, "").await, ServingStatus::NotServing);
    let mut client = TeacherServiceClient::new(ch.clone());
    let e = client.model_info(authed(v1::ModelInfoRequest {})).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");

    h.slot.set(Engine::start(tiny(), 2), "cpu".into()).await;
    assert_eq!(health(&ch, SERVICE_NAME).await, ServingStatus::Serving);
    let info = client.model_info(authed(v1::ModelInfoRequest {})).await.unwrap().into_inner();
    assert_eq!(info.name, "tiny-11");
    assert_eq!(info.input_shape, vec![3, 8, 8]);
    assert_eq!(info.classes.len(), 8);
    assert_eq!(info.fingerprint, tiny().info().fingerprint.to_string());
    assert!(info.has_landmarks && info.has_valence_arousal);

    h.slot.clear().await;
    assert_eq!(health(&ch, SERVICE_NAME).await, ServingStatus::NotServing);
    stop.send(()).unwrap();
    h.wait().await.unwrap();
}

#[tokio::test]
async fn requests_without_the_right_token_are_refused() {
    let (h, _stop) = start(Some(TOKEN)).await;
    h.slot.set(Engine::start(tiny(), 2), "cpu".into()).await;
    let mut client = TeacherServiceClient::new(channel(h.addr).await);
    let e = client.model_info(v1::ModelInfoRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let mut wrong = tonic::Request::new(v1::ModelInfoRequest {});
    wrong.metadata_mut().insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(client.model_info(wrong).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    assert!(client.model_info(authed(v1::ModelInfoRequest {})).await.is_ok());
    // Health stays open for probes without credentials.
    assert_eq!(health(&channel(h.addr).await, SERVICE_NAME).await, ServingStatus::Serving);
}

#[tokio::test]
async fn infer_round_trip_with_images_and_tensors() {
    let (h, _stop) = start(None).await;
    let teacher = tiny();
    let engine = Engine::start(teacher.clone(), 2);
    h.slot.set(engine.clone(), "cpu".into()).await;
    let mut client = TeacherServiceClient::new(channel(h.addr).await);

    let a = png(3);
    let flip = v1::ViewSpec { index: 1, crop: vec![], flip: true };
    let items = vec![
        v1::EncodedImage { data: a.clone(), box_xywh: vec![1.0, 1.0, 8.0, 8.0], view: None },
        v1::EncodedImage { data: b"garbage".to_vec(), box_xywh: vec![], view: None },
        v1::EncodedImage { data: a.clone(), box_xywh: vec![], view: Some(flip.clone()) },
    ];
    let req = v1::InferRequest {
        request_id: 42,
        input: Some(v1::infer_request::Input::Images(v1::EncodedImages { items })),
        want_embedding: true,
        want_probs: true,
        want_landmarks: false,
    };
    let resp = client.infer(req).await.unwrap().into_inner();
    assert_eq!(resp.request_id, 42);
    assert_eq!(resp.teacher_fingerprint, teacher.info().fingerprint.to_string());
    assert_eq!(resp.predictions.len(), 3);
    assert!(resp.predictions[1].error.contains("decode"), "{:?}", resp.predictions[1]);
    assert!(resp.predictions[1].logits.is_empty());
    let pp = &teacher.info().preprocess;
    let views = [distillery_data::View::plain()];
    let want0 = prepare_views(&a, Some([1.0, 1.0, 8.0, 8.0]), &views, pp).unwrap().remove(0);
    let want2 = prepare_views(&a, None, &[flip.to_view("v").unwrap()], pp).unwrap().remove(0);
    let direct = engine.infer([want0.clone(), want2].concat(), 2).await.unwrap();
    assert_eq!(resp.predictions[0].logits, direct.logits_row(0));
    assert_eq!(resp.predictions[2].logits, direct.logits_row(1));
    let p = &resp.predictions[0];
    assert!((p.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    assert_eq!(p.embedding.len(), distillery_teacher::tiny::TINY_EMBEDDING_DIM);
    assert!(p.landmarks.is_empty(), "landmarks were not asked for");
    assert_eq!(p.valence, direct.valence.as_ref().map(|v| v[0]));

    // The same input as a raw tensor gives the same logits.
    let t = v1::Tensor::from_f32(&[1, 3, 8, 8], &want0);
    let req = v1::InferRequest {
        input: Some(v1::infer_request::Input::Tensor(t)),
        want_landmarks: true,
        ..Default::default()
    };
    let resp = client.infer(req).await.unwrap().into_inner();
    assert_eq!(resp.predictions[0].logits, direct.logits_row(0));
    assert_eq!(resp.predictions[0].landmarks.len(), 136);

    // A tensor of the wrong shape is refused, naming the field.
    let t = v1::Tensor::from_f32(&[1, 3, 4, 4], &[0.0; 48]);
    let req = v1::InferRequest { input: Some(v1::infer_request::Input::Tensor(t)), ..Default::default() };
    let e = client.infer(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("input.tensor.shape"), "{e}");
    let e = client.infer(v1::InferRequest::default()).await.unwrap_err();
    assert!(e.message().contains("`input`"), "{e}");
}

#[tokio::test]
async fn infer_stream_answers_every_request() {
    let (h, _stop) = start(None).await;
    h.slot.set(Engine::start(tiny(), 2), "cpu".into()).await;
    let mut client = TeacherServiceClient::new(channel(h.addr).await);
    let reqs: Vec<v1::InferRequest> = (0..5u64)
        .map(|i| v1::InferRequest {
            request_id: i,
            input: Some(v1::infer_request::Input::Images(v1::EncodedImages {
                items: vec![v1::EncodedImage { data: png(i as u8 + 1), box_xywh: vec![], view: None }],
            })),
            ..Default::default()
        })
        .collect();
    let mut stream = client.infer_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        assert_eq!(r.predictions.len(), 1);
        assert!(r.predictions[0].error.is_empty());
        ids.push(r.request_id);
    }
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn reflection_lists_the_teacher_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let (h, _stop) = start(Some(TOKEN)).await;
    let mut client = ServerReflectionClient::new(channel(h.addr).await);
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
}
