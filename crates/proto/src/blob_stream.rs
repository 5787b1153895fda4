//! A blob as a gRPC stream of `BlobChunk`s and back: the first message carries the blob's
//! metadata, every message a piece of at most [`PIECE`] bytes, so neither side holds the blob in
//! memory. Export file downloads and Binary content downloads both travel this way.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use fhirmesh_core::FhirError;
use fhirmesh_core::blob::{Blob, BlobError, BlobInfo, BlobKey};
use futures::{Stream, StreamExt};
use tonic::{Status, Streaming};

use crate::convert::{WireError, timestamp_from_wire, timestamp_to_wire};
use crate::pb;

/// A blob's pieces on the wire.
pub(crate) type BlobStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send + 'static>>;

/// Largest data piece of a message.
pub(crate) const PIECE: usize = 1024 * 1024;

/// `bytes` cut into pieces of at most [`PIECE`] bytes (one, possibly empty, when shorter).
pub(crate) fn pieces(mut bytes: Bytes) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(bytes.len() / PIECE + 1);
    while bytes.len() > PIECE {
        out.push(bytes.split_to(PIECE));
    }
    out.push(bytes);
    out
}

/// Streams `blob`: its metadata first, then its content; a failing read ends the stream with
/// UNAVAILABLE naming `what`.
pub(crate) fn blob_to_wire(blob: Blob, what: &'static str) -> BlobStream {
    let info = pb::BlobInfo {
        size: blob.info.size,
        content_type: blob.info.content_type.clone(),
        etag: blob.info.etag.clone(),
        last_modified: blob.info.last_modified.map(timestamp_to_wire),
    };
    let first = futures::stream::once(async move { Ok(pb::BlobChunk { info: Some(info), data: Bytes::new() }) });
    let rest = blob.body.flat_map(move |piece| {
        let messages: Vec<Result<pb::BlobChunk, Status>> = match piece {
            Ok(bytes) => pieces(bytes).into_iter().map(|data| Ok(pb::BlobChunk { info: None, data })).collect(),
            Err(error) => vec![Err(Status::unavailable(format!("reading {what}: {error}")))],
        };
        futures::stream::iter(messages)
    });
    Box::pin(first.chain(rest))
}

/// The blob a [`blob_to_wire`] stream carries, as `key`. `status_error` turns the failing call's
/// status into the caller's error; a stream broken midway ends the body with
/// [`BlobError::Unavailable`] naming `peer`.
pub(crate) async fn blob_from_wire(
    mut stream: Streaming<pb::BlobChunk>,
    key: BlobKey,
    service: &'static str,
    peer: Arc<str>,
    status_error: impl Fn(&Status) -> FhirError,
) -> Result<Blob, FhirError> {
    let malformed =
        |reason: &str| WireError::Invalid { field: "info", reason: reason.to_owned() }.into_internal(service);
    let first = match stream.message().await {
        Ok(Some(first)) => first,
        Ok(None) => return Err(malformed("the stream ended before its first message")),
        Err(status) => return Err(status_error(&status)),
    };
    let info = first.info.ok_or_else(|| malformed("the first message has no blob information"))?;
    let last_modified = match info.last_modified {
        Some(at) => Some(timestamp_from_wire(Some(at), "last_modified").map_err(|e| e.into_internal(service))?),
        None => None,
    };
    let size = info.size;
    let info = BlobInfo { key, size, content_type: info.content_type, etag: info.etag, last_modified };
    let head = futures::stream::iter((!first.data.is_empty()).then_some(Ok(first.data)));
    let body = futures::stream::unfold(Some(stream), move |stream| {
        let peer = peer.clone();
        async move {
            let mut stream = stream?;
            match stream.message().await {
                Ok(Some(piece)) => Some((Ok(piece.data), Some(stream))),
                Ok(None) => None,
                Err(status) => Some((Err(BlobError::Unavailable(format!("{peer}: {}", status.message()))), None)),
            }
        }
    });
    Ok(Blob { info, range: 0..size, body: head.chain(body).boxed() })
}
