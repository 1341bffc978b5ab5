//! The node's dataset cache under `<data-dir>/cache`.
//!
//! Layout:
//! - `blobs/<xx>/<sha256>.<mode>`: verified bodies, one file per body (and permission mode),
//!   shared by every dataset and version on the node;
//! - `trees/<pin key>/`: one pinned version, materialized as hard links to the blobs;
//! - `trees/<pin key>.json`: the tree's record (pin, entries, when it was built); the record's
//!   mtime is when a mount last used the tree;
//! - `tmp/`: downloads and trees under construction, emptied at start.
//!
//! Rules: a body is verified against its SHA-256 before it is linked into a tree; a tree is
//! renamed into place whole and only then gets its record, so a crash never leaves a partial
//! tree that looks ready; a tree that a mount uses (read from the mount table, never kept in
//! memory) is never evicted; a blob goes only when no tree links it (link count 1).

mod build;
pub mod fill;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::dataset::manifest::{Entry, EntryKind};
use crate::dataset::pin::{Pin, Sources};
use crate::error::Kind;
use crate::metrics::Metrics;
use crate::mount::{Origin, mountinfo};
use crate::units::human;

/// The name prefix of a tree set aside as damaged (kept in `tmp/` while a mount uses it).
const SET_ASIDE: &str = "damaged-";

/// Cache settings from the config file (`cache:`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Bodies beyond this are evicted (trees no mount uses, least recently used first).
    pub max_bytes: u64,
    /// How long one publish waits for a download before answering UNAVAILABLE.
    pub publish_timeout: Duration,
    /// Bodies downloaded at once.
    pub jobs: usize,
    /// Bytes of bodies held in memory at once by the process's pushes, pulls and fills
    /// ([`crate::dataset::budget`]).
    pub max_memory: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_bytes: 100 << 30,
            publish_timeout: Duration::from_secs(60),
            jobs: 64,
            max_memory: crate::dataset::budget::DEFAULT,
        }
    }
}

/// A cache failure, with the CSI kind it maps to. Cloneable: every waiter of a fill gets it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(Kind::Internal, message)
    }

    fn io(context: impl std::fmt::Display, err: std::io::Error) -> Error {
        Error::new(crate::error::io_kind(&err), format!("{context}: {err}"))
    }
}

impl From<crate::dataset::repo::Error> for Error {
    fn from(err: crate::dataset::repo::Error) -> Error {
        Error::new(err.kind(), err.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a tree holds; stored beside it as `<key>.json`: this as the first line, then the
/// tree's entries a line each in tree order (format 2; a format 1 record, one document with
/// its entries inside, is still read), so a record is written and checked as a stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    #[serde(default = "first_format")]
    pub format: u32,
    pub pin: Pin,
    pub files: usize,
    pub bytes: u64,
    /// Nanoseconds since the epoch when the tree was complete; no file in it is newer.
    pub built_ns: u64,
}

/// The record format this build writes.
const RECORD_FORMAT: u32 = 2;

fn first_format() -> u32 {
    1
}

/// A record's entries, as they are read.
type RecordEntries = crate::dataset::manifest::Entries<std::io::BufReader<std::fs::File>>;

/// One row of `lanes cache ls`.
#[derive(Debug, Clone, Serialize)]
pub struct TreeRow {
    pub key: String,
    pub dataset: String,
    pub files: usize,
    pub bytes: u64,
    pub last_used_unix: u64,
    pub mounts: usize,
}

/// What a prune removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pruned {
    pub trees: Vec<String>,
    pub blobs: usize,
    pub bytes: u64,
}

/// The cache of one node.
pub struct Cache {
    root: PathBuf,
    settings: Settings,
    sources: Arc<Sources>,
    fills: fill::Fills,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("root", &self.root)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

impl Cache {
    /// Opens (creating) the cache in `<data_dir>/cache` and clears what a crash left behind:
    /// unfinished downloads and trees, trees without a record, records without a tree.
    pub fn open(
        data_dir: &Path,
        settings: Settings,
        sources: Arc<Sources>,
        metrics: Arc<Metrics>,
    ) -> Result<Cache> {
        let root = data_dir.join("cache");
        for dir in ["blobs", "trees", "tmp"] {
            let path = root.join(dir);
            std::fs::create_dir_all(&path).map_err(|e| Error::io(path.display(), e))?;
        }
        let root = root
            .canonicalize()
            .map_err(|e| Error::io(root.display(), e))?;
        let cache = Cache {
            root,
            settings,
            sources,
            fills: fill::Fills::default(),
            metrics,
        };
        cache.recover()?;
        Ok(cache)
    }

    /// The cache directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    fn trees(&self) -> PathBuf {
        self.root.join("trees")
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.trees().join(format!("{key}.json"))
    }

    /// The pin of `reference` when it names a version explicitly and this node holds that
    /// version's finished tree: committed versions never change, so the bucket need not be
    /// asked (a warm publish costs no request, and works while the bucket is down).
    pub fn cached_pin(&self, reference: &str) -> Option<Pin> {
        let pin = self.sources().explicit_pin(reference)?;
        self.record_path(&pin.key()).is_file().then_some(pin)
    }

    /// Where the tree of `pin` lives (whether or not it is there).
    pub fn tree_path(&self, pin: &Pin) -> PathBuf {
        self.trees().join(pin.key())
    }

    fn recover(&self) -> Result<()> {
        let users = self.users()?;
        let tmp = self.root.join("tmp");
        for entry in read_dir(&tmp)? {
            let name = format!("tmp/{}", entry.file_name().to_string_lossy());
            if !users.contains_key(&name) {
                remove_any(&entry.path());
            }
        }
        for entry in read_dir(&self.trees())? {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(key) = name.strip_suffix(".json") {
                if !self.trees().join(key).is_dir() {
                    remove_any(&path);
                }
            } else if !self.record_path(&name).exists()
                && !users.contains_key(&format!("trees/{name}"))
            {
                remove_any(&path);
            }
        }
        Ok(())
    }

    /// Removes trees that were set aside as damaged while mounted, once no mount uses them.
    pub fn sweep_set_aside(&self) {
        let Ok(users) = self.users() else {
            return;
        };
        let Ok(entries) = read_dir(&self.root.join("tmp")) else {
            return;
        };
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(SET_ASIDE) && !users.contains_key(&format!("tmp/{name}")) {
                remove_any(&entry.path());
            }
        }
    }

    /// How many mounts use each `trees/<key>` and `tmp/<name>`: bind mounts whose root lies
    /// in the cache, and overlays whose lower layer does.
    fn users(&self) -> Result<HashMap<String, usize>> {
        let table = mountinfo::read().map_err(|e| Error::io("read /proc/self/mountinfo", e))?;
        let origin = Origin::of(&table, &self.root);
        let mut users: HashMap<String, usize> = HashMap::new();
        let mut count = |rest: &Path| {
            let mut parts = rest.components();
            if let (Some(a), Some(b)) = (parts.next(), parts.next()) {
                let key = Path::new(&a).join(b).to_string_lossy().into_owned();
                *users.entry(key).or_default() += 1;
            }
        };
        for entry in &table {
            if entry.fs_type == "overlay" {
                let lowers = entry
                    .super_options
                    .iter()
                    .filter_map(|o| o.strip_prefix("lowerdir="));
                for lower in lowers.flat_map(|l| l.split(':')) {
                    if let Ok(rest) = Path::new(lower).strip_prefix(&self.root) {
                        count(rest);
                    }
                }
            } else if origin.device == Some((entry.major, entry.minor))
                && let Ok(rest) = entry.root.strip_prefix(&origin.root)
            {
                count(rest);
            }
        }
        Ok(users)
    }

    /// The tree of `pin`, downloading it if needed. Waits at most `wait`; past that the
    /// download goes on in the background and the answer is UNAVAILABLE with the progress.
    pub async fn tree(self: &Arc<Self>, pin: &Pin, wait: Duration) -> Result<PathBuf> {
        let this = self.clone();
        let ready_pin = pin.clone();
        let ready = tokio::task::spawn_blocking(move || this.ready(&ready_pin))
            .await
            .map_err(|e| Error::internal(format!("cache check task: {e}")))??;
        if let Some(tree) = ready {
            return Ok(tree);
        }
        let key = pin.key();
        let (fill, finisher) = self.fills.join(&key);
        if let Some(finisher) = finisher {
            let (this, pin, progress) = (self.clone(), pin.clone(), fill.progress.clone());
            tokio::spawn(async move {
                let shown = pin.to_string();
                tracing::info!(dataset = shown, "downloading dataset into the node cache");
                // The fill that just ended may have built the tree already.
                let ready = {
                    let (this, pin) = (this.clone(), pin.clone());
                    tokio::task::spawn_blocking(move || this.ready(&pin)).await
                };
                if let Ok(Ok(Some(tree))) = ready {
                    this.fills.finish(finisher, Ok(tree));
                    return;
                }
                let build = this.build(&pin, &progress);
                tokio::pin!(build);
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                let outcome = loop {
                    tokio::select! {
                        outcome = &mut build => break outcome,
                        _ = tick.tick() => {
                            this.metrics.fill_progress(&shown, &progress);
                            tracing::info!(dataset = shown, progress = progress.describe(), "downloading");
                        }
                    }
                };
                this.metrics.fill_ended(&shown);
                match &outcome {
                    Ok(_) => tracing::info!(
                        dataset = shown,
                        progress = progress.describe(),
                        "dataset cached"
                    ),
                    Err(e) => {
                        tracing::warn!(dataset = shown, error = %e, "dataset download failed")
                    }
                }
                this.fills.finish(finisher, outcome);
            });
        }
        match tokio::time::timeout(wait, fill.finished()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::new(
                Kind::Unavailable,
                format!(
                    "dataset {pin} is still downloading to this node: {}; the download \
                     continues and a retry succeeds once it is complete",
                    fill.progress.describe()
                ),
            )),
        }
    }

    /// The tree of `pin` when it is complete and intact (marking it used); `None` when it
    /// must be built. A tree that fails the check is set aside, never mounted.
    fn ready(&self, pin: &Pin) -> Result<Option<PathBuf>> {
        let key = pin.key();
        let (tree, record_path) = (self.trees().join(&key), self.record_path(&key));
        let Some((record, entries)) = self.record_with_entries(&key) else {
            return Ok(None);
        };
        if let Err(problem) = check_tree(&tree, &record, entries, self.settings.jobs.min(8)) {
            tracing::warn!(dataset = %pin, problem, "cached tree is damaged; setting it aside and fetching again");
            let _ = std::fs::remove_file(&record_path);
            let aside = self
                .root
                .join("tmp")
                .join(format!("{SET_ASIDE}{key}-{}", now_ns()));
            std::fs::rename(&tree, &aside).map_err(|e| Error::io(tree.display(), e))?;
            if !self
                .users()?
                .contains_key(&format!("tmp/{}", file_name(&aside)))
            {
                remove_any(&aside);
            }
            return Ok(None);
        }
        let touched = std::fs::File::options()
            .write(true)
            .open(&record_path)
            .and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = touched {
            tracing::debug!(error = %e, "could not mark the tree used");
        }
        Ok(Some(tree))
    }

    /// The record of a tree, without its entries.
    fn record(&self, key: &str) -> Option<Record> {
        self.record_with_entries(key).map(|(record, _)| record)
    }

    /// The record of a tree, and its entries to read.
    fn record_with_entries(&self, key: &str) -> Option<(Record, RecordEntries)> {
        let file = std::fs::File::open(self.record_path(key)).ok()?;
        let reader = std::io::BufReader::with_capacity(1 << 16, file);
        crate::dataset::manifest::read_framed::<Record, _>(reader).ok()
    }

    /// Bytes of every body in the cache.
    fn blob_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for shard in read_dir(&self.root.join("blobs"))? {
            for blob in read_dir(&shard.path())? {
                total += blob.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// The trees, newest use first.
    pub fn list(&self) -> Result<Vec<TreeRow>> {
        let users = self.users()?;
        let mut rows = Vec::new();
        for entry in read_dir(&self.trees())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".json") else {
                continue;
            };
            let Some(record) = self.record(key) else {
                continue;
            };
            let last_used_unix = entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            rows.push(TreeRow {
                key: key.to_owned(),
                dataset: record.pin.to_string(),
                files: record.files,
                bytes: record.bytes,
                last_used_unix,
                mounts: users.get(&format!("trees/{key}")).copied().unwrap_or(0),
            });
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.last_used_unix));
        Ok(rows)
    }

    /// Evicts trees no mount uses, least recently used first, until the bodies fit in
    /// `limit` (all unused trees when `limit` is 0), then removes bodies no tree links.
    /// `keep` is never evicted.
    pub fn prune(&self, limit: u64, keep: Option<&str>) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        let mut total = self.blob_bytes()?;
        let mut oldest_first = self.list()?;
        oldest_first.reverse();
        for row in oldest_first {
            if limit > 0 && total <= limit {
                break;
            }
            if row.mounts > 0 || Some(row.key.as_str()) == keep {
                continue;
            }
            let _ = std::fs::remove_file(self.record_path(&row.key));
            remove_any(&self.trees().join(&row.key));
            tracing::info!(
                tree = row.key,
                dataset = row.dataset,
                "evicted from the node cache"
            );
            pruned.trees.push(row.key);
            let (blobs, bytes) = self.collect_blobs()?;
            pruned.blobs += blobs;
            pruned.bytes += bytes;
            total = total.saturating_sub(bytes);
        }
        let (blobs, bytes) = self.collect_blobs()?;
        pruned.blobs += blobs;
        pruned.bytes += bytes;
        Ok(pruned)
    }

    /// Removes bodies that no tree links (link count 1).
    fn collect_blobs(&self) -> Result<(usize, u64)> {
        let (mut count, mut bytes) = (0, 0);
        for shard in read_dir(&self.root.join("blobs"))? {
            for blob in read_dir(&shard.path())? {
                if let Ok(meta) = blob.metadata()
                    && meta.nlink() == 1
                    && std::fs::remove_file(blob.path()).is_ok()
                {
                    count += 1;
                    bytes += meta.len();
                }
            }
        }
        Ok((count, bytes))
    }

    /// Makes room for `incoming` more bytes of bodies within the size limit and the disk's
    /// free space, evicting unused trees; RESOURCE_EXHAUSTED when that is not enough.
    fn make_room(&self, incoming: u64, pin: &Pin) -> Result<()> {
        let limit = self.settings.max_bytes;
        let held = self.blob_bytes()?;
        if held + incoming > limit {
            self.prune(limit.saturating_sub(incoming).max(1), Some(&pin.key()))?;
            let held = self.blob_bytes()?;
            if held + incoming > limit {
                return Err(Error::new(
                    Kind::ResourceExhausted,
                    format!(
                        "dataset {pin} needs {} more in the node cache, which holds {} in use \
                         of its {} limit (cache.max_bytes); free volumes on this node or raise \
                         the limit",
                        human(incoming),
                        human(held),
                        human(limit)
                    ),
                ));
            }
        }
        let free = nix::sys::statvfs::statvfs(&self.root)
            .map(|s| s.blocks_available() * s.fragment_size())
            .map_err(|e| Error::io(self.root.display(), e.into()))?;
        if incoming > free {
            return Err(Error::new(
                Kind::ResourceExhausted,
                format!(
                    "dataset {pin} needs {} on this node's disk and only {} is free",
                    human(incoming),
                    human(free)
                ),
            ));
        }
        Ok(())
    }

    /// The fills running now, with their progress (for `lanes cache ls` and metrics).
    pub fn running(&self) -> Vec<(String, Arc<fill::Progress>)> {
        self.fills.running()
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(std::result::Result::ok).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(dir.display(), e)),
    }
}

/// Removes a file or a whole directory, never following symlinks; failures are logged.
fn remove_any(path: &Path) {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "could not remove from the cache");
    }
}

/// Checks a tree against its record without reading bodies: every entry present with its
/// kind, size and mode, no file modified since the tree was built, and as many files as the
/// record counts. Entries are read and checked a batch at a time, in parallel.
fn check_tree(
    tree: &Path,
    record: &Record,
    entries: RecordEntries,
    jobs: usize,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !tree.is_dir() {
        return Err("the tree directory is missing".into());
    }
    let check = |entry: &Entry| {
        let path = tree.join(&entry.path);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) => return Some(format!("{}: {e}", entry.path)),
        };
        let modified = (meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128) as u64;
        let fine = match entry.kind {
            EntryKind::Dir => meta.is_dir(),
            EntryKind::Symlink => meta.is_symlink(),
            EntryKind::File => {
                meta.is_file()
                    && meta.len() == entry.size
                    && meta.permissions().mode() & 0o777 == build::file_mode(entry.mode)
                    && modified <= record.built_ns
            }
        };
        (!fine).then(|| format!("{} changed since it was cached", entry.path))
    };
    let (mut entries, mut files) = (entries, 0);
    loop {
        let batch: Vec<Entry> = entries
            .by_ref()
            .take(4096)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the tree's record is damaged: {e}"))?;
        if batch.is_empty() {
            break;
        }
        files += batch.iter().filter(|e| e.kind == EntryKind::File).count();
        let problems = crate::copy::parallel(&batch, jobs, check);
        if let Some(problem) = problems.into_iter().flatten().next() {
            return Err(problem);
        }
    }
    if files != record.files {
        return Err(format!(
            "the tree's record lists {files} files, and counts {}",
            record.files
        ));
    }
    Ok(())
}
