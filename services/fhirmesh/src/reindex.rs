//! `fhirmesh reindex`: rebuilds the search index from the store's change log with a progress bar.
//! Applying is idempotent per version, so a server running at the same time (whose indexer keeps
//! applying new writes) and the rebuild never undo each other.

use anyhow::Context;
use fhirmesh_core::indexer::{Indexer, IndexerConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;

const BATCH: usize = 4000;

pub fn run(config: &Config) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(async {
        let changes = crate::stores::open(config, &crate::stores::Aws::new(&config.aws)).await?.changes;
        let index = crate::stores::open_index(config).await?;
        let total = changes.latest_sequence().await.context("cannot read the change log")?;
        index.clear().await.context("cannot clear the search index")?;
        let indexer =
            Indexer::new(index.clone(), changes, IndexerConfig { batch_size: BATCH, ..IndexerConfig::default() });
        let progress = ProgressBar::new(total).with_style(
            ProgressStyle::with_template("{spinner} reindexing [{bar:40}] {pos}/{len} changes ({per_sec}, eta {eta})")
                .context("progress template")?
                .progress_chars("=> "),
        );
        let position = indexer
            .catch_up_reporting(|position| progress.set_position(position.min(total)))
            .await
            .map_err(|e| anyhow::anyhow!("indexing failed: {e}"))?;
        progress.finish_and_clear();
        println!("fhirmesh: reindexed {position} changes into the {:?} search index", config.search.backend);
        Ok(())
    })
}
