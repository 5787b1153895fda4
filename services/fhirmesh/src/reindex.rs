//! `fhirmesh reindex`: rebuilds the search index from the store's change log with a progress bar.
//! Applying is idempotent per version, so a server running at the same time (whose indexer keeps
//! applying new writes) and the rebuild never undo each other. On OpenSearch the rebuild fills a
//! new index generation while searches keep reading the served one, then switches them at once
//! (`fhirmesh_core::indexer::rebuild`); the SQLite index is cleared and refilled in place.

use std::time::Duration;

use anyhow::Context;
use fhirmesh_core::indexer::{RebuildEvent, RebuildOptions, rebuild};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;

const BATCH: usize = 4000;

pub fn run(config: &Config, retire_after: Duration) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    // The IG search parameters are extracted too (installed before the registry is used).
    crate::ig::load(config)?;
    runtime.block_on(async {
        let changes = crate::stores::open(config, &crate::stores::Aws::new(&config.aws)).await?.changes;
        let index = crate::stores::open_index(config).await?;
        let total = changes.latest_sequence().await.context("cannot read the change log")?;
        let progress = ProgressBar::new(total).with_style(
            ProgressStyle::with_template("{spinner} reindexing [{bar:40}] {pos}/{len} changes ({per_sec}, eta {eta})")
                .context("progress template")?
                .progress_chars("=> "),
        );
        let report = |event| match event {
            RebuildEvent::Applied(position) => progress.set_position(position.min(total)),
            RebuildEvent::Promoted { generation } => {
                progress.finish_and_clear();
                println!("fhirmesh: searches now read index generation {generation}");
            }
            RebuildEvent::Retiring(after) => {
                println!("fhirmesh: dropping the previous generation in {} s", after.as_secs())
            }
        };
        let options = RebuildOptions { batch_size: BATCH, retire_after };
        let position =
            rebuild(index, changes, options, report).await.map_err(|e| anyhow::anyhow!("indexing failed: {e}"))?;
        progress.finish_and_clear();
        println!("fhirmesh: reindexed {position} changes into the {:?} search index", config.search.backend);
        Ok(())
    })
}
