//! The property test of `fhirmesh_core::search_oracle` on the SQLite index.

use std::sync::Arc;

use fhirmesh_core::search_oracle::{Scale, agrees_with_the_reference_evaluator};
use futures::FutureExt;
use tempfile::TempDir;

use super::tests::open;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_agrees_with_the_reference_evaluator() {
    let dir = TempDir::new().expect("temp dir");
    let index = Arc::new(open(&dir));
    let searcher = index.clone();
    let search = move |tenant, query, cursor: Option<String>, now| {
        let index = searcher.clone();
        async move { index.search_at(&tenant, &query, cursor.as_deref(), now).await }.boxed()
    };
    let scale = Scale { cases: 200, docs: 50, queries_per_corpus: 10 };
    agrees_with_the_reference_evaluator(index.as_ref(), &search, scale).await;
}
