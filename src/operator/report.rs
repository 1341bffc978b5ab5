//! The copy's side of a FastStage's live status: `lanes copy --report-to NAMESPACE/NAME`
//! patches that FastStage's status subresource with its counters every second while it runs,
//! and once more when it ends. The Job's service account may patch that one status and
//! nothing else; a report that fails is logged and the copy goes on.

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use super::faststage::FastStage;
use crate::copy::{Checksum, Progress, Summary};

/// How often progress reaches the status.
pub const EVERY: Duration = Duration::from_secs(1);

/// Where a copy reports.
#[derive(Clone)]
pub struct Reporter {
    api: Api<FastStage>,
    name: String,
    checksum: Checksum,
}

impl Reporter {
    /// Connects to the API (in-cluster or kubeconfig) for `target` = `namespace/name`.
    pub async fn connect(target: &str, checksum: Checksum) -> Result<Reporter, String> {
        let (namespace, name) = target
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            .ok_or_else(|| {
                format!("--report-to {target:?}: expected NAMESPACE/NAME of a FastStage")
            })?;
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("--report-to: no Kubernetes API reachable: {e}"))?;
        Ok(Reporter {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            checksum,
        })
    }

    async fn patch(&self, status: Value) {
        let patch = json!({ "status": status });
        if let Err(e) = self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(error = %e, faststage = %self.name, "could not report progress");
        }
    }

    /// Reports `progress` as soon as the copy knows its totals, then every [`EVERY`], until
    /// the task is dropped.
    pub async fn follow(self, progress: Progress) {
        let started = Instant::now();
        while progress.snapshot().files_total == 0 && !progress.snapshot().finished {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            let now = progress.snapshot();
            let rate = now.bytes as f64 / started.elapsed().as_secs_f64().max(0.001);
            let left = now.bytes_total.saturating_sub(now.bytes);
            let eta = if rate > 0.0 {
                (left as f64 / rate).ceil() as u64
            } else {
                0
            };
            self.patch(json!({
                "phase": "Copying",
                "checksum": self.checksum_name(),
                "filesDone": now.files,
                "filesTotal": now.files_total,
                "bytesDone": now.bytes,
                "bytesTotal": now.bytes_total,
                "bytesPerSecond": rate as u64,
                "etaSeconds": eta,
                "progress": progress_text(now.files, now.files_total, now.bytes, now.bytes_total),
            }))
            .await;
            tokio::time::sleep(EVERY).await;
        }
    }

    /// The last report: final counts and what verification found.
    pub async fn finish(&self, summary: &Summary) {
        let verification = match (self.checksum, summary.failed) {
            (_, failed) if failed > 0 => format!("failed: {failed} entries could not be copied"),
            (Checksum::None, _) => "not asked (checksum none)".to_owned(),
            (Checksum::Sha256, _) => format!(
                "passed: {} files copied and verified by SHA-256 against their source",
                summary.verified
            ),
            (Checksum::SizeMtime, _) => format!(
                "passed: {} files copied, each checked by size; {} unchanged (same size and \
                 modification time)",
                summary.files_copied, summary.files_skipped
            ),
        };
        let files = summary.files_copied + summary.files_skipped;
        self.patch(json!({
            // Verifying: the copy is done and checked; the Job's end makes it Succeeded.
            "phase": if summary.failed > 0 || self.checksum == Checksum::None { "Copying" } else { "Verifying" },
            "checksum": self.checksum_name(),
            "filesDone": files,
            "filesTotal": summary.files_total,
            "bytesDone": summary.bytes_total,
            "bytesTotal": summary.bytes_total,
            "bytesPerSecond": summary.bytes_per_second as u64,
            "etaSeconds": 0,
            "progress": progress_text(files, summary.files_total, summary.bytes_total, summary.bytes_total),
            "verification": verification,
        }))
        .await;
    }

    fn checksum_name(&self) -> &'static str {
        match self.checksum {
            Checksum::SizeMtime => "size-mtime",
            Checksum::Sha256 => "sha256",
            Checksum::None => "none",
        }
    }
}

fn progress_text(files: u64, files_total: u64, bytes: u64, bytes_total: u64) -> String {
    format!(
        "{files}/{files_total} files, {}/{}",
        crate::units::human(bytes),
        crate::units::human(bytes_total)
    )
}
