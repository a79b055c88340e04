//! Bearer-token authentication shared by the servers and clients of Distillery's services.
//!
//! Servers wrap only their Distillery service in [`BearerAuth`]; `grpc.health.v1.Health` and
//! reflection stay open so that probes (kubelet gRPC probes cannot send metadata) and
//! `grpcurl list` work without credentials. Clients attach the token with [`AttachBearer`].

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// Server side: checks `authorization: Bearer <token>` when a token is configured (`bearer ` is
/// accepted too; whitespace around the token is ignored). Without a token every call passes.
#[derive(Clone, Debug)]
pub struct BearerAuth {
    token: Option<Arc<str>>,
}

impl BearerAuth {
    pub fn new(token: Option<&str>) -> Self {
        Self { token: token.map(Arc::from) }
    }
}

/// Equal-time comparison, so the time a refusal takes says nothing about the token.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else { return Ok(req) };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
        match given {
            Some(g) if same_bytes(g.trim().as_bytes(), token.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated("missing `authorization: Bearer <token>` metadata")),
        }
    }
}

/// Client side: adds `authorization: Bearer <token>` to every call when a token is given.
#[derive(Clone, Debug, Default)]
pub struct AttachBearer(Option<MetadataValue<Ascii>>);

impl AttachBearer {
    /// Fails (naming `what`, e.g. the flag) when the token cannot be sent as a header value.
    pub fn new(token: Option<&str>, what: &str) -> Result<Self, String> {
        match token {
            None => Ok(Self(None)),
            Some(t) => format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map(|v| Self(Some(v)))
                .map_err(|_| format!("{what}: the token is not printable ASCII")),
        }
    }
}

impl tonic::service::Interceptor for AttachBearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    fn with_header(v: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = v {
            r.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        r
    }

    #[test]
    fn checks_the_token_only_when_one_is_configured() {
        let mut open = BearerAuth::new(None);
        assert!(open.call(with_header(None)).is_ok());
        let mut auth = BearerAuth::new(Some("s3cret"));
        assert!(auth.call(with_header(Some("Bearer s3cret"))).is_ok());
        assert!(auth.call(with_header(Some("bearer s3cret "))).is_ok());
        let e = auth.call(with_header(Some("Bearer nope"))).unwrap_err();
        assert_eq!((e.code(), e.message()), (tonic::Code::Unauthenticated, "invalid bearer token"));
        let e = auth.call(with_header(None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("missing"), "{}", e.message());
    }

    #[test]
    fn the_client_side_sends_what_the_server_side_accepts() {
        let mut attach = AttachBearer::new(Some("s3cret"), "--auth-token").unwrap();
        let req = attach.call(Request::new(())).unwrap();
        assert!(BearerAuth::new(Some("s3cret")).call(req).is_ok());
        let req = AttachBearer::new(None, "--auth-token").unwrap().call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        let e = AttachBearer::new(Some("bad\ntoken"), "--auth-token").unwrap_err();
        assert!(e.contains("--auth-token"), "{e}");
    }
}
