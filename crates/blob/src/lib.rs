//! Blob store adapters behind [`fhirmesh_core::blob::BlobStore`].
//!
//! What it is: [`LocalBlobStore`] (files under a root directory; embedded mode) and [`S3BlobStore`]
//! (objects in one S3 bucket; the mesh), both tenant-scoped through [`fhirmesh_core::blob::BlobKey`].
//! What it is not: the Binary service or the exporter (they use the port), nor HTTP serving of
//! blobs. Key layout, atomicity, the multipart protocol and presigning: `design.md`.

pub mod local;
pub mod s3;

pub use local::LocalBlobStore;
pub use s3::{S3BlobStore, S3Options};
