//! `TeacherService` over gRPC: the loaded teacher answers `Infer`, `InferStream` and `ModelInfo`,
//! next to the standard health service (see [`EngineSlot`] for what it reports) and reflection.
//!
//! Only `TeacherService` requires the bearer token when one is configured; health and reflection
//! stay open so load balancers and `grpcurl` can probe a worker without credentials.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use distillery_proto::server::ServerTask;
use distillery_proto::v1;
use distillery_proto::v1::teacher_service_server::{TeacherService, TeacherServiceServer};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::prep::{input_shape, prepare_views};

/// Health service name of the teacher service.
pub const SERVICE_NAME: &str = "distillery.v1.TeacherService";

/// The engine the service answers with; empty until a teacher is loaded, swapped when a lease
/// names another teacher. Health follows it:
///
/// - `distillery.v1.TeacherService` is `SERVING` while a teacher is loaded (it answers `Infer`);
/// - `""` (the whole worker, what probes ask) is `SERVING` while a teacher is loaded **or** the
///   worker can take work (registered with the coordinator; see [`EngineSlot::set_accepting_work`]),
///   so a generic worker is ready while idle and stays ready while it swaps teachers.
#[derive(Clone)]
pub struct EngineSlot {
    engine: Arc<RwLock<Option<(Engine, String)>>>,
    accepting: Arc<AtomicBool>,
    health: HealthReporter,
}

impl EngineSlot {
    fn new(health: HealthReporter) -> Self {
        Self { engine: Arc::new(RwLock::new(None)), accepting: Arc::new(AtomicBool::new(false)), health }
    }

    /// Installs `engine` (running on `device`) and reports `SERVING`.
    pub async fn set(&self, engine: Engine, device: String) {
        *self.engine.write().expect("engine slot lock") = Some((engine, device));
        self.report().await;
    }

    /// Removes the engine: `TeacherService` reports `NOT_SERVING` (the worker as a whole stays
    /// `SERVING` if it can take work).
    pub async fn clear(&self) {
        *self.engine.write().expect("engine slot lock") = None;
        self.report().await;
    }

    /// Whether the worker can take work (it holds a session with the coordinator).
    pub async fn set_accepting_work(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::SeqCst);
        self.report().await;
    }

    /// Publishes the health statuses implied by the current state.
    async fn report(&self) {
        let loaded = self.engine.read().expect("engine slot lock").is_some();
        let ready = loaded || self.accepting.load(Ordering::SeqCst);
        let status = |on: bool| if on { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.health.set_service_status(SERVICE_NAME, status(loaded)).await;
        self.health.set_service_status("", status(ready)).await;
    }

    pub fn get(&self) -> Option<(Engine, String)> {
        self.engine.read().expect("engine slot lock").clone()
    }
}

/// Implementation of `distillery.v1.TeacherService`.
#[derive(Clone)]
pub struct TeacherServer {
    slot: EngineSlot,
}

impl TeacherServer {
    fn engine(&self) -> std::result::Result<(Engine, String), Status> {
        self.slot.get().ok_or_else(|| Status::unavailable("no teacher is loaded yet"))
    }
}

fn status_of(e: Error) -> Status {
    match e {
        Error::Input(m) => Status::invalid_argument(m),
        Error::EngineStopped | Error::Cancelled => Status::unavailable(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Answers one request (shared by `Infer` and `InferStream`).
async fn answer(engine: &Engine, req: v1::InferRequest) -> std::result::Result<v1::InferResponse, Status> {
    let info = engine.info();
    let max_batch = info.max_batch;
    let per_item = engine.input_len();
    // Prepared inputs of the good items, and an error per bad item.
    let (inputs, errors): (Vec<f32>, Vec<Option<String>>) = match req.input {
        None => {
            return Err(Status::invalid_argument("invalid field `input`: is required (images or tensor)"));
        }
        Some(v1::infer_request::Input::Tensor(t)) => {
            let (shape, values) = t.to_f32("input.tensor")?;
            let want = input_shape(&info.preprocess);
            if shape.len() != 4 || shape[1..] != want {
                return Err(Status::invalid_argument(format!(
                    "invalid field `input.tensor.shape`: {shape:?}, the teacher takes [n, {}, {}, {}]",
                    want[0], want[1], want[2]
                )));
            }
            (values, vec![None; shape[0]])
        }
        Some(v1::infer_request::Input::Images(imgs)) => {
            let mut jobs = Vec::with_capacity(imgs.items.len());
            for (i, item) in imgs.items.into_iter().enumerate() {
                let field = format!("input.images.items[{i}]");
                let face_box = item.face_box(&field)?;
                let view = match &item.view {
                    Some(v) => v.to_view(&format!("{field}.view"))?,
                    None => distillery_data::View::plain(),
                };
                jobs.push((item.data, face_box, view));
            }
            if jobs.len() > max_batch {
                return Err(Status::invalid_argument(format!(
                    "batch of {} images is larger than the teacher's max_batch {max_batch}",
                    jobs.len()
                )));
            }
            let pp = info.preprocess.clone();
            tokio::task::spawn_blocking(move || {
                let mut values = Vec::new();
                let mut errors = Vec::with_capacity(jobs.len());
                for (data, face_box, view) in jobs {
                    match prepare_views(&data, face_box, &[view], &pp) {
                        Ok(mut v) => {
                            values.append(&mut v[0]);
                            errors.push(None);
                        }
                        Err(e) => errors.push(Some(e)),
                    }
                }
                (values, errors)
            })
            .await
            .map_err(|e| Status::internal(format!("image preparation failed: {e}")))?
        }
    };
    if errors.len() > max_batch {
        return Err(Status::invalid_argument(format!(
            "batch of {} is larger than the teacher's max_batch {max_batch}",
            errors.len()
        )));
    }
    let n_ok = inputs.len() / per_item.max(1);
    let started = Instant::now();
    let out = if n_ok > 0 { Some(engine.infer(inputs, n_ok).await.map_err(status_of)?) } else { None };
    let forward_micros = started.elapsed().as_micros() as u64;
    let mut k = 0;
    let predictions = errors
        .into_iter()
        .map(|err| match (err, &out) {
            (Some(error), _) => v1::Prediction { error, ..Default::default() },
            (None, Some(o)) => {
                let logits = o.logits_row(k).to_vec();
                let p = v1::Prediction {
                    probs: if req.want_probs { softmax(&logits) } else { vec![] },
                    logits,
                    valence: o.valence.as_ref().map(|v| v[k]),
                    arousal: o.arousal.as_ref().map(|v| v[k]),
                    embedding: if req.want_embedding {
                        o.embedding_row(k).map(<[f32]>::to_vec).unwrap_or_default()
                    } else {
                        vec![]
                    },
                    landmarks: if req.want_landmarks {
                        o.landmarks_row(k).map(<[f32]>::to_vec).unwrap_or_default()
                    } else {
                        vec![]
                    },
                    error: String::new(),
                };
                k += 1;
                p
            }
            (None, None) => unreachable!("a good item implies outputs"),
        })
        .collect();
    Ok(v1::InferResponse {
        request_id: req.request_id,
        predictions,
        teacher_fingerprint: info.fingerprint.to_string(),
        forward_micros,
    })
}

#[tonic::async_trait]
impl TeacherService for TeacherServer {
    async fn infer(
        &self,
        request: Request<v1::InferRequest>,
    ) -> std::result::Result<Response<v1::InferResponse>, Status> {
        let (engine, _) = self.engine()?;
        answer(&engine, request.into_inner()).await.map(Response::new)
    }

    type InferStreamStream = ReceiverStream<std::result::Result<v1::InferResponse, Status>>;

    async fn infer_stream(
        &self,
        request: Request<tonic::Streaming<v1::InferRequest>>,
    ) -> std::result::Result<Response<Self::InferStreamStream>, Status> {
        let (engine, _) = self.engine()?;
        let mut input = request.into_inner();
        // Two answers in flight at most: a slow reader slows the stream instead of growing memory.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            while let Some(next) = input.next().await {
                let reply = match next {
                    Ok(req) => answer(&engine, req).await,
                    Err(status) => Err(status),
                };
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn model_info(
        &self,
        _request: Request<v1::ModelInfoRequest>,
    ) -> std::result::Result<Response<v1::ModelInfoResponse>, Status> {
        let (engine, device) = self.engine()?;
        let info = engine.info();
        Ok(Response::new(v1::ModelInfoResponse {
            name: info.name.clone(),
            fingerprint: info.fingerprint.to_string(),
            classes: info.classes.names().to_vec(),
            input_shape: input_shape(&info.preprocess).iter().map(|&d| d as u64).collect(),
            preprocess_json: serde_json::to_string(&info.preprocess)
                .map_err(|e| Status::internal(e.to_string()))?,
            device,
            max_batch: info.max_batch as u32,
            has_valence_arousal: info.has_valence_arousal,
            embedding_dim: info.embedding_dim.unwrap_or(0) as u32,
            has_landmarks: info.has_landmarks,
        }))
    }
}

/// Options of the gRPC server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub auth_token: Option<String>,
    pub max_message_bytes: usize,
    /// Serve over TLS with this certificate and key.
    pub tls: Option<distillery_proto::transport::TlsPaths>,
}

/// A running `TeacherService`.
pub struct TeacherServerHandle {
    pub addr: SocketAddr,
    pub slot: EngineSlot,
    /// The server's task. It stops when the `shutdown` future given to [`serve`] resolves, or when
    /// it is stopped through this handle ([`TeacherServerHandle::shutdown`], or dropping it).
    pub task: ServerTask<Error>,
}

impl TeacherServerHandle {
    /// Stops the server, lets running calls finish, and waits for it.
    pub async fn shutdown(self) -> Result<()> {
        self.task.shutdown().await.map_err(server_task_failed)?
    }

    /// Waits for the server to stop on the `shutdown` future given to [`serve`].
    pub async fn wait(self) -> Result<()> {
        self.task.wait().await.map_err(server_task_failed)?
    }
}

fn server_task_failed(e: tokio::task::JoinError) -> Error {
    Error::Transport { what: "server task".into(), reason: e.to_string() }
}

/// Binds `listen` and serves the teacher, health and reflection services until `shutdown` resolves
/// (or the returned handle stops the server).
/// Health is `NOT_SERVING` until [`EngineSlot::set`] installs a teacher or
/// [`EngineSlot::set_accepting_work`] says the worker can take work.
pub async fn serve(
    listen: SocketAddr,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<TeacherServerHandle> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| Error::Transport {
        what: format!("binding TeacherService on {listen}"),
        reason: e.to_string(),
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Transport { what: "TeacherService listener".into(), reason: e.to_string() })?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let slot = EngineSlot::new(health);
    slot.report().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(distillery_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Transport { what: "building gRPC reflection".into(), reason: e.to_string() })?;
    let teacher = TeacherServiceServer::new(TeacherServer { slot: slot.clone() })
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    let auth = distillery_proto::auth::BearerAuth::new(opts.auth_token.as_deref());
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.tls {
        let tls_error = |reason: String| Error::Transport { what: "TeacherService TLS".into(), reason };
        let config = tls.server_config().map_err(|e| tls_error(e.to_string()))?;
        builder = builder.tls_config(config).map_err(|e| {
            tls_error(format!(
                "certificate {} and key {}: {}",
                tls.cert.display(),
                tls.key.display(),
                distillery_proto::transport::error_chain(&e)
            ))
        })?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(teacher, auth));
    let incoming = TcpListenerStream::new(listener);
    let task = ServerTask::spawn(move |stop| async move {
        let signal = async move {
            tokio::select! {
                () = shutdown => {}
                () = stop => {}
            }
        };
        router.serve_with_incoming_shutdown(incoming, signal).await.map_err(|e| Error::Transport {
            what: format!("TeacherService on {addr}"),
            reason: e.to_string(),
        })
    });
    Ok(TeacherServerHandle { addr, slot, task })
}
