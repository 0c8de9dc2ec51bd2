//! The gRPC plumbing both the agent link and the gRPC frontend answer through: a service
//! with one streaming method, served as plain HTTP so [`crate::grpc`] frames its messages.

use tonic::Status;

/// A gRPC service with one streaming method, answered as plain HTTP so [`crate::grpc`]
/// frames its messages; [`Endpoint`] makes it a service tonic's server can route to.
pub(super) trait Method: Clone + Send + 'static {
    /// The service name (the first path segment).
    const SERVICE: &'static str;

    /// The response to a call, or the status that refuses it.
    fn answer(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status>;
}

#[derive(Clone)]
pub(super) struct Endpoint<M>(pub(super) M);

impl<M: Method> tonic::server::NamedService for Endpoint<M> {
    const NAME: &'static str = M::SERVICE;
}

impl<M: Method> tower::Service<http::Request<tonic::body::Body>> for Endpoint<M> {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(self.0.answer(request).unwrap_or_else(Status::into_http)))
    }
}

/// Refuses a call to anything but `path`, or one whose messages would be compressed.
pub(super) fn check_call(
    request: &http::Request<tonic::body::Body>,
    path: &str,
) -> Result<(), Status> {
    if request.uri().path() != path {
        return Err(Status::unimplemented(format!(
            "no method {}",
            request.uri().path()
        )));
    }
    if header_str(request.headers(), "grpc-encoding").is_some_and(|e| e != "identity") {
        return Err(Status::unimplemented(
            "compressed streams are not supported",
        ));
    }
    Ok(())
}

pub(super) fn header_str<'a>(headers: &'a http::HeaderMap, key: &str) -> Option<&'a str> {
    headers.get(key).and_then(|v| v.to_str().ok())
}
