//! Kafka frames decoded and encoded on the task that serves the connection.
//!
//! Tansu's `BytesFrameLayer` hands every request's decoding and every response's encoding to
//! tokio's blocking pool (`spawn_blocking`): two thread hand-offs per request, each a futex
//! wake-up and a context switch. Decoding a frame takes microseconds, the hand-offs cost more:
//! under load they were the largest part of the broker's CPU (about 40 % of its samples at
//! 1,500 events/s, spent waking and parking pool threads). This layer does the same
//! conversion inline. It has no SASL (the embedded broker offers none), which is the only
//! other thing Tansu's layer does.

use bytes::Bytes;
use rama::{Context, Layer, Service};
use tansu_sans_io::{Frame, Header};

/// A [`Layer`] turning request bytes into [`Frame`]s and response frames back into bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct InlineFrameLayer;

impl<S> Layer<S> for InlineFrameLayer {
    type Service = InlineFrameService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InlineFrameService { inner }
    }
}

/// See [`InlineFrameLayer`].
#[derive(Clone, Debug)]
pub struct InlineFrameService<S> {
    inner: S,
}

impl<S, State> Service<State, Bytes> for InlineFrameService<S>
where
    S: Service<State, Frame, Response = Frame>,
    State: Clone + Send + Sync + 'static,
    S::Error: From<tansu_sans_io::Error>,
{
    type Response = Bytes;
    type Error = S::Error;

    async fn serve(&self, ctx: Context<State>, req: Bytes) -> Result<Self::Response, Self::Error> {
        let request = Frame::request_from_bytes(req)?;
        let (api_key, api_version, correlation_id) =
            (request.api_key()?, request.api_version()?, request.correlation_id()?);
        let Frame { body, .. } = self.inner.serve(ctx, request).await?;
        Ok(Frame::response(Header::Response { correlation_id }, body, api_key, api_version)?)
    }
}
