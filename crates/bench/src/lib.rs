//! `fhirmesh load` and `fhirmesh bench`: tools that talk HTTP to any FHIR server (fhirmesh or
//! another), so figures are measured the same way every time.
//!
//! - [`client`]: a small HTTP/1.1 client over a fixed number of kept-alive connections, the one
//!   both tools use (and the baseline is measured with).
//! - [`load`]: a seeded synthetic data generator and a file loader (NDJSON, transaction Bundles).
//! - [`bench`]: named, bounded scenarios reporting throughput and latency percentiles, and the
//!   bare-hyper baseline every figure is stated against.
//! - [`export`]: a Bulk Data client (`fhirmesh export`): kick-off, polls, downloads.

pub mod bench;
pub mod client;
pub mod export;
pub mod load;
