//! Index generations, for a reindex with no downtime. The documents of generation `g` live in
//! `{prefix}-g{g}-{type}`; searches read the aliases `{prefix}-r-{type}`, which point at the served
//! generation. The `state` document of the meta index says which generation searches read
//! (`read`), which ones live writes go to (`write`), which one a rebuild is filling (`building`),
//! and each generation's own watermark (`seq`). See `design.md` for why every step is safe for
//! read-your-writes.

use std::collections::BTreeMap;

use opensearch::http::StatusCode;
use opensearch::indices::{IndicesDeleteParts, IndicesGetAliasParts};
use opensearch::params::Refresh;
use opensearch::{GetParts, IndexParts, UpdateParts};
use serde::Deserialize;
use serde_json::{Value, json};

use fhirmesh_core::ports::{IndexError, IndexGenerations, NewGeneration};
use fhirmesh_fhir::ResourceType;

use crate::{OpenSearchIndex, Target, check, unavailable};

pub(crate) const STATE_ID: &str = "state";

/// The `state` document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct State {
    /// The generation searches read (the aliases point at it).
    pub read: u32,
    /// The generations live writes go to: `read`, and the one being built during a rebuild.
    pub write: Vec<u32>,
    #[serde(default)]
    pub building: Option<u32>,
    /// The number the next generation gets.
    pub next: u32,
    /// Each generation's watermark, by generation number.
    #[serde(default)]
    pub seq: BTreeMap<String, u64>,
}

impl State {
    fn initial() -> Value {
        json!({"read": 1, "write": [1], "building": null, "next": 2, "seq": {"1": 0}})
    }

    pub fn watermark(&self, generation: u32) -> u64 {
        self.seq.get(&generation.to_string()).copied().unwrap_or(0)
    }
}

/// Raises the served generation's watermark, but only if the batch went to every generation live
/// writes go to now and the served generation is still the one the batch checked: otherwise a
/// rebuild began or switched meanwhile and the caller writes again where it did not yet.
const RAISE_SERVED: &str = "\
    for (def g : ctx._source.write) { if (!params.written.contains(g)) { ctx.op = 'none'; return; } }
    if (ctx._source.read != params.read) { ctx.op = 'none'; return; }
    String key = String.valueOf(params.read);
    def current = ctx._source.seq.get(key);
    if (current == null || params.seq > current) { ctx._source.seq.put(key, params.seq); } else { ctx.op = 'none'; }";

/// Raises one generation's watermark (a rebuild filling it).
const RAISE_GENERATION: &str = "\
    String key = String.valueOf(params.generation);
    def current = ctx._source.seq.get(key);
    if (current == null || params.seq > current) { ctx._source.seq.put(key, params.seq); } else { ctx.op = 'none'; }";

/// Starts a new generation: live writes go to it as well; an unfinished one is abandoned.
const BEGIN: &str = "\
    int g = ctx._source.next;
    ctx._source.next = g + 1;
    if (ctx._source.building != null) { ctx._source.seq.remove(String.valueOf(ctx._source.building)); }
    ctx._source.building = g;
    ctx._source.write = [ctx._source.read, g];
    ctx._source.seq.put(String.valueOf(g), 0);";

/// Searches read the built generation, whose watermark starts at least at the served one's: it
/// holds everything the served one does (the rebuild replayed the change log up to then and live
/// writes went to both since the rebuild began).
const PROMOTE: &str = "\
    if (ctx._source.building != params.generation) { ctx.op = 'none'; return; }
    String old = String.valueOf(ctx._source.read);
    String key = String.valueOf(params.generation);
    def served = ctx._source.seq.get(old);
    if (served != null && served > ctx._source.seq.get(key)) { ctx._source.seq.put(key, served); }
    ctx._source.read = params.generation;
    ctx._source.building = null;";

/// Once the aliases moved: live writes go to the served generation only.
const WRITE_SERVED_ONLY: &str = "\
    if (ctx._source.read != params.generation) { ctx.op = 'none'; return; }
    ctx._source.write = [params.generation];";

/// Forgets the watermarks of generations that are gone.
const FORGET: &str = "\
    ctx._source.seq.keySet().removeIf(k -> !params.keep.contains(k));";

/// A fresh, empty generation that is served at once (a clear).
const RESTART: &str = "\
    int g = ctx._source.next;
    ctx._source.next = g + 1;
    ctx._source.read = g;
    ctx._source.write = [g];
    ctx._source.building = null;
    ctx._source.seq = ['' + g: 0];";

impl OpenSearchIndex {
    /// The concrete index of `resource_type`'s documents in `generation`.
    pub fn generation_index(&self, generation: u32, resource_type: ResourceType) -> String {
        format!("{}-g{generation}-{}", self.prefix, resource_type.as_str().to_ascii_lowercase())
    }

    fn generation_pattern(&self) -> String {
        format!("{}-g*", self.prefix)
    }

    pub(crate) async fn create_state(&self) -> Result<(), IndexError> {
        let response = self
            .client
            .index(IndexParts::IndexId(&self.meta_index(), STATE_ID))
            .op_type(opensearch::params::OpType::Create)
            .body(State::initial())
            .refresh(Refresh::True)
            .send()
            .await
            .map_err(|e| unavailable("create the state document", e))?;
        if response.status_code() == StatusCode::CONFLICT {
            return Ok(()); // already there
        }
        check("create the state document", response).await.map(|_| ())
    }

    pub(crate) async fn state(&self) -> Result<State, IndexError> {
        let response = self
            .client
            .get(GetParts::IndexId(&self.meta_index(), STATE_ID))
            .send()
            .await
            .map_err(|e| unavailable("read the index state", e))?;
        if response.status_code() == StatusCode::NOT_FOUND {
            return serde_json::from_value(State::initial()).map_err(|e| IndexError::Internal(e.to_string()));
        }
        let body = check("read the index state", response).await?;
        parse_state(body.get("_source"))
    }

    /// Runs `script` on the state document and returns the state after it.
    async fn update_state(&self, what: &str, script: &str, params: Value) -> Result<State, IndexError> {
        let response = self
            .client
            .update(UpdateParts::IndexId(&self.meta_index(), STATE_ID))
            .body(json!({"script": {"lang": "painless", "source": script, "params": params}}))
            ._source(&["true"])
            .refresh(Refresh::True)
            .retry_on_conflict(10)
            .send()
            .await
            .map_err(|e| unavailable(what, e))?;
        let body = check(what, response).await?;
        parse_state(body.pointer("/get/_source"))
    }

    /// Raises the served generation's watermark if `written` holds every generation live writes
    /// go to and `read` is still served; returns the state either way.
    pub(crate) async fn raise_served(&self, read: u32, written: &[u32], sequence: u64) -> Result<State, IndexError> {
        let params = json!({"read": read, "written": written, "seq": sequence});
        self.update_state("raise the watermark", RAISE_SERVED, params).await
    }

    pub(crate) async fn raise_generation(&self, generation: u32, sequence: u64) -> Result<State, IndexError> {
        let params = json!({"generation": generation, "seq": sequence});
        self.update_state("raise the watermark", RAISE_GENERATION, params).await
    }

    /// Points the alias of each of `types` at its index in `generation` (the served one), taking
    /// it off any other generation in the same atomic request. Remembered per process.
    pub(crate) async fn ensure_aliases(&self, generation: u32, types: &[ResourceType]) -> Result<(), IndexError> {
        let missing: Vec<ResourceType> = {
            let aliased = self.aliased.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            types.iter().copied().filter(|t| !aliased.contains(&(generation, *t))).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut actions = Vec::new();
        for resource_type in &missing {
            let alias = self.index_of(*resource_type);
            actions.push(json!({"remove": {"index": self.generation_pattern(), "alias": alias}}));
            actions.push(json!({"add": {"index": self.generation_index(generation, *resource_type), "alias": alias}}));
        }
        self.update_aliases("point the search aliases", actions).await?;
        let mut aliased = self.aliased.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        aliased.extend(missing.into_iter().map(|t| (generation, t)));
        Ok(())
    }

    async fn update_aliases(&self, what: &str, actions: Vec<Value>) -> Result<(), IndexError> {
        let response = self
            .client
            .indices()
            .update_aliases()
            .body(json!({"actions": actions}))
            .send()
            .await
            .map_err(|e| unavailable(what, e))?;
        check(what, response).await.map(|_| ())
    }

    /// Every resource index of every generation, by generation.
    async fn generation_indices(&self) -> Result<BTreeMap<u32, Vec<String>>, IndexError> {
        let pattern = self.generation_pattern();
        let response = self
            .client
            .indices()
            .get_alias(IndicesGetAliasParts::Index(&[pattern.as_str()]))
            .send()
            .await
            .map_err(|e| unavailable("list the resource indices", e))?;
        if response.status_code() == StatusCode::NOT_FOUND {
            return Ok(BTreeMap::new());
        }
        let body = check("list the resource indices", response).await?;
        let mut indices: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let names = body.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
        for name in names {
            if let Some(generation) = self.generation_of(&name) {
                indices.entry(generation).or_default().push(name);
            }
        }
        Ok(indices)
    }

    /// `17` for `{prefix}-g17-patient`.
    fn generation_of(&self, index: &str) -> Option<u32> {
        let rest = index.strip_prefix(&self.prefix)?.strip_prefix("-g")?;
        let (number, _) = rest.split_once('-')?;
        number.parse().ok()
    }

    /// Points every search alias at `generation`'s indices, all in one atomic request (a type
    /// `generation` does not have yet loses its alias: it had nothing up to the watermark).
    async fn serve_aliases(&self, generation: u32) -> Result<(), IndexError> {
        let indices = self.generation_indices().await?;
        if indices.is_empty() {
            return Ok(()); // no index, so no alias either
        }
        let mut actions =
            vec![json!({"remove": {"index": self.generation_pattern(), "alias": format!("{}-r-*", self.prefix)}})];
        let prefix = format!("{}-g{generation}-", self.prefix);
        for index in indices.get(&generation).into_iter().flatten() {
            let Some(resource_type) = index.strip_prefix(&prefix) else { continue };
            actions.push(json!({"add": {"index": index, "alias": format!("{}-r-{resource_type}", self.prefix)}}));
        }
        self.update_aliases("switch the search aliases", actions).await
    }

    async fn drop_indices(&self, names: &[String]) -> Result<(), IndexError> {
        // Bounded urls: a few dozen names per request.
        for chunk in names.chunks(32) {
            let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let response = self
                .client
                .indices()
                .delete(IndicesDeleteParts::Index(&names))
                .ignore_unavailable(true)
                .send()
                .await
                .map_err(|e| unavailable("drop an index generation", e))?;
            check("drop an index generation", response).await?;
        }
        Ok(())
    }

    /// Drops every generation `state` neither reads nor builds, and forgets their watermarks.
    async fn drop_unused(&self, state: &State) -> Result<(), IndexError> {
        let keep: Vec<u32> = std::iter::once(state.read).chain(state.building).collect();
        let unused: Vec<String> = self
            .generation_indices()
            .await?
            .into_iter()
            .filter(|(generation, _)| !keep.contains(generation))
            .flat_map(|(_, names)| names)
            .collect();
        self.drop_indices(&unused).await?;
        let keep: Vec<String> = keep.iter().map(u32::to_string).collect();
        self.update_state("forget dropped generations", FORGET, json!({"keep": keep})).await.map(|_| ())
    }

    /// [`fhirmesh_core::ports::SearchIndex::clear`]: a fresh generation, served at once (so no
    /// tombstone of the old one survives), and every other one dropped.
    pub(crate) async fn restart(&self) -> Result<(), IndexError> {
        self.ensure_template().await?;
        let state = self.update_state("start a fresh generation", RESTART, json!({})).await?;
        self.drop_unused(&state).await
    }

    /// The generation searches read now.
    pub async fn served_generation(&self) -> Result<u32, IndexError> {
        Ok(self.state().await?.read)
    }

    /// The generations that have resource indices, in order.
    pub async fn stored_generations(&self) -> Result<Vec<u32>, IndexError> {
        Ok(self.generation_indices().await?.into_keys().collect())
    }

    fn pinned(&self, generation: u32) -> OpenSearchIndex {
        OpenSearchIndex { target: Target::Generation(generation), ..self.clone() }
    }
}

fn parse_state(source: Option<&Value>) -> Result<State, IndexError> {
    let source = source.ok_or_else(|| IndexError::Internal("OpenSearch index state: no document".into()))?;
    serde_json::from_value(source.clone())
        .map_err(|e| IndexError::Internal(format!("OpenSearch index state {source}: {e}")))
}

#[async_trait::async_trait]
impl IndexGenerations for OpenSearchIndex {
    async fn begin(&self) -> Result<NewGeneration, IndexError> {
        self.ensure_template().await?;
        let state = self.update_state("begin a generation", BEGIN, json!({})).await?;
        let generation =
            state.building.ok_or_else(|| IndexError::Internal("OpenSearch index state: no generation began".into()))?;
        // An abandoned generation's indices (a rebuild that failed) go now.
        self.drop_unused(&state).await?;
        Ok(NewGeneration {
            generation,
            building: std::sync::Arc::new(self.pinned(generation)),
            live: std::sync::Arc::new(OpenSearchIndex { target: Target::Live, ..self.clone() }),
        })
    }

    async fn promote(&self, generation: u32) -> Result<(), IndexError> {
        let state = self.update_state("promote a generation", PROMOTE, json!({"generation": generation})).await?;
        if state.read != generation {
            return Err(IndexError::Internal(format!(
                "generation {generation} is no longer being built (another rebuild began: {:?})",
                state.building
            )));
        }
        self.serve_aliases(generation).await?;
        self.update_state("write the served generation only", WRITE_SERVED_ONLY, json!({"generation": generation}))
            .await
            .map(|_| ())
    }

    async fn retire(&self) -> Result<(), IndexError> {
        let state = self.state().await?;
        self.drop_unused(&state).await?;
        // Again, in case a writer that had not seen the switch yet pointed an alias back.
        self.serve_aliases(state.read).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpenSearchConfig;

    #[test]
    fn generations_are_read_back_from_index_names() {
        let index = OpenSearchIndex::new(OpenSearchConfig { url: "http://127.0.0.1:9".into(), prefix: "fm".into() })
            .expect("client");
        let name = index.generation_index(17, ResourceType::parse("Patient").expect("type"));
        assert_eq!(name, "fm-g17-patient");
        assert_eq!(index.generation_of(&name), Some(17));
        assert_eq!(index.generation_of("fm-g-patient"), None);
        assert_eq!(index.generation_of("other-g3-patient"), None);
        assert_eq!(index.generation_of("fm-r-patient"), None);
    }

    #[test]
    fn a_missing_watermark_is_zero() {
        let state: State = serde_json::from_value(State::initial()).expect("state");
        assert_eq!((state.read, state.write.as_slice(), state.building, state.next), (1, &[1][..], None, 2));
        assert_eq!(state.watermark(1), 0);
        assert_eq!(state.watermark(7), 0);
    }
}
