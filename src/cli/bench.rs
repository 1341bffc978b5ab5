//! `lanes csi bench`: latency of CreateVolume, DeleteVolume, NodePublishVolume and
//! NodeUnpublishVolume against a running plugin, sequential and concurrent, plus the plugin's
//! resident memory idle and under that load. A benchmark, not a test: it reports, it does not
//! judge.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tonic::Status;

use super::csi::{Clients, mount_capability};
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::*;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub ops: usize,
    pub concurrency: Vec<usize>,
    /// Where staging and target directories are made.
    pub workdir: PathBuf,
    /// The plugin's PID, to read its resident memory.
    pub server_pid: Option<u32>,
    /// The profile volumes are created with (none: the default profile).
    pub profile: Option<String>,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Stage,
    Publish,
    Unpublish,
    Unstage,
    Delete,
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// What every call of one run shares: the profile, and the ID prefix its volumes get.
#[derive(Debug, Clone)]
struct Target {
    parameters: std::collections::HashMap<String, String>,
    id_prefix: String,
}

async fn one(c: &mut Clients, op: Op, name: &str, dir: &Path, t: &Target) -> Result<(), Status> {
    let id = format!("{}{name}", t.id_prefix);
    let staging = dir.join(format!("{name}.stage"));
    let target = dir.join(format!("{name}.target"));
    let capability = Some(mount_capability(Mode::SingleNodeWriter, &[]));
    match op {
        Op::Create => {
            c.controller
                .create_volume(CreateVolumeRequest {
                    name: name.to_owned(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: 1 << 20,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter, &[])],
                    parameters: t.parameters.clone(),
                    ..Default::default()
                })
                .await?;
        }
        Op::Stage => {
            std::fs::create_dir_all(&staging).map_err(|e| Status::internal(e.to_string()))?;
            c.node
                .node_stage_volume(NodeStageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging.display().to_string(),
                    volume_capability: capability,
                    ..Default::default()
                })
                .await?;
        }
        Op::Publish => {
            c.node
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging.display().to_string(),
                    target_path: target.display().to_string(),
                    volume_capability: capability,
                    ..Default::default()
                })
                .await?;
        }
        Op::Unpublish => {
            c.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: id,
                    target_path: target.display().to_string(),
                })
                .await?;
        }
        Op::Unstage => {
            c.node
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging.display().to_string(),
                })
                .await?;
            let _ = std::fs::remove_dir(&staging);
        }
        Op::Delete => {
            c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: id,
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(())
}

/// Runs `op` over every volume with `workers` concurrent clients; returns sorted latencies.
async fn phase(
    clients: &Clients,
    op: Op,
    names: Arc<Vec<String>>,
    workers: usize,
    dir: &Path,
    target: &Target,
) -> Result<Vec<Duration>, Status> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (mut c, names, next, dir, target) = (
            clients.clone(),
            names.clone(),
            next.clone(),
            dir.to_owned(),
            target.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = names.get(index) else { break };
                let started = Instant::now();
                one(&mut c, op, name, &dir, &target).await?;
                times.push(started.elapsed());
            }
            Ok::<_, Status>(times)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.map_err(|e| Status::internal(e.to_string()))??);
    }
    all.sort();
    Ok(all)
}

/// The parameters for `profile`, and the prefix of its volumes' IDs (learnt from one volume
/// created and deleted again).
async fn target_of(clients: &Clients, profile: Option<&str>) -> Result<Target, Status> {
    let parameters: std::collections::HashMap<String, String> = profile
        .map(|p| ("profile".to_owned(), p.to_owned()))
        .into_iter()
        .collect();
    let mut c = clients.clone();
    let name = "bench-probe";
    let volume = c
        .controller
        .create_volume(CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter, &[])],
            parameters: parameters.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .unwrap_or_default();
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume.volume_id.clone(),
            ..Default::default()
        })
        .await?;
    let id_prefix = volume
        .volume_id
        .strip_suffix(name)
        .unwrap_or("local/")
        .to_owned();
    Ok(Target {
        parameters,
        id_prefix,
    })
}

/// Runs the benchmark against the plugin at `socket`.
pub async fn run(socket: &Path, options: &BenchOptions) -> Result<(Value, String), Status> {
    let clients = Clients::connect(socket)
        .await
        .map_err(|e| Status::unavailable(format!("connect {}: {e}", socket.display())))?;
    std::fs::create_dir_all(&options.workdir).map_err(|e| Status::internal(e.to_string()))?;
    let target = target_of(&clients, options.profile.as_deref()).await?;
    let idle = options.server_pid.and_then(rss_kib);
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = options.server_pid.map(|pid| {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kib) = rss_kib(pid) {
                    peak.fetch_max(kib as usize, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    });
    let mut results = Vec::new();
    let mut text = format!(
        "{:<12} {:>11} {:>9} {:>9} {:>10}\n",
        "rpc", "concurrency", "p50 ms", "p99 ms", "ops/s"
    );
    for &workers in &options.concurrency {
        let names: Arc<Vec<String>> = Arc::new(
            (0..options.ops)
                .map(|i| format!("bench-c{workers}-{i}"))
                .collect(),
        );
        for op in [
            Op::Create,
            Op::Stage,
            Op::Publish,
            Op::Unpublish,
            Op::Unstage,
            Op::Delete,
        ] {
            let started = Instant::now();
            let times = phase(
                &clients,
                op,
                names.clone(),
                workers,
                &options.workdir,
                &target,
            )
            .await?;
            let rate = times.len() as f64 / started.elapsed().as_secs_f64();
            let (p50, p99) = (percentile(&times, 50.0), percentile(&times, 99.0));
            let rpc = format!("{op:?}");
            text.push_str(&format!(
                "{rpc:<12} {workers:>11} {p50:>9.3} {p99:>9.3} {rate:>10.0}\n"
            ));
            results.push(json!({"rpc": rpc, "concurrency": workers, "ops": times.len(), "p50_ms": p50, "p99_ms": p99, "ops_per_second": rate}));
        }
    }
    if let Some(task) = sampler {
        task.abort();
    }
    let peak = peak.load(Ordering::Relaxed) as u64;
    if let Some(idle) = idle {
        text.push_str(&format!(
            "rss idle {:.1} MiB, peak under load {:.1} MiB\n",
            idle as f64 / 1024.0,
            peak as f64 / 1024.0
        ));
    }
    Ok((
        json!({"results": results, "rss_idle_kib": idle, "rss_peak_kib": peak}),
        text,
    ))
}
