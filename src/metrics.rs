//! Prometheus metrics and the `/metrics` + `/healthz` HTTP endpoint.
//!
//! Per RPC: a count by result code and a latency histogram. The registry is owned by the
//! [`Metrics`] value handed to the services; there is no global registry.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Counters and histograms of the CSI services.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    calls: IntCounterVec,
    seconds: HistogramVec,
    fill_bytes: IntGaugeVec,
    fill_files: IntGaugeVec,
    access: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let calls = IntCounterVec::new(
            Opts::new("lanes_csi_calls_total", "CSI calls by RPC and gRPC code"),
            &["rpc", "code"],
        )
        .expect("static metric definition");
        let seconds = HistogramVec::new(
            HistogramOpts::new("lanes_csi_call_seconds", "CSI call latency by RPC").buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
            ]),
            &["rpc"],
        )
        .expect("static metric definition");
        let gauge = |name: &str, help: &str| {
            let gauge = IntGaugeVec::new(Opts::new(name, help), &["dataset", "of"])
                .expect("static metric definition");
            registry
                .register(Box::new(gauge.clone()))
                .expect("registered once");
            gauge
        };
        let fill_bytes = gauge(
            "lanes_dataset_download_bytes",
            "Bytes of a dataset being cached on this node: done and total",
        );
        let fill_files = gauge(
            "lanes_dataset_download_files",
            "Files of a dataset being cached on this node: done and total",
        );
        let access = IntCounterVec::new(
            Opts::new(
                "lanes_access_decisions_total",
                "Permission decisions on owned volumes at NodePublishVolume, by outcome",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(access.clone()))
            .expect("registered once");
        registry
            .register(Box::new(calls.clone()))
            .expect("registered once");
        registry
            .register(Box::new(seconds.clone()))
            .expect("registered once");
        Metrics {
            registry,
            calls,
            seconds,
            fill_bytes,
            fill_files,
            access,
        }
    }

    /// Counts one permission decision: `allowed`, `read-only`, `denied` or `unavailable`.
    pub fn access_decision(&self, outcome: &str) {
        self.access.with_label_values(&[outcome]).inc();
    }

    /// Records one finished call and the name of its gRPC code (`Ok`, `NotFound`, ...).
    pub fn record(&self, rpc: &str, code: &str, started: Instant) {
        self.calls.with_label_values(&[rpc, code]).inc();
        self.seconds
            .with_label_values(&[rpc])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records how far the download of `dataset` into the node cache has come.
    pub fn fill_progress(&self, dataset: &str, progress: &crate::cache::fill::Progress) {
        use std::sync::atomic::Ordering::Relaxed;
        let set = |gauge: &IntGaugeVec, of: &str, value: &std::sync::atomic::AtomicU64| {
            gauge
                .with_label_values(&[dataset, of])
                .set(value.load(Relaxed) as i64)
        };
        set(&self.fill_bytes, "done", &progress.bytes_done);
        set(&self.fill_bytes, "total", &progress.bytes_total);
        set(&self.fill_files, "done", &progress.files_done);
        set(&self.fill_files, "total", &progress.files_total);
    }

    /// Drops the progress series of a download that ended.
    pub fn fill_ended(&self, dataset: &str) {
        for of in ["done", "total"] {
            let _ = self.fill_bytes.remove_label_values(&[dataset, of]);
            let _ = self.fill_files.remove_label_values(&[dataset, of]);
        }
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Connections the metrics endpoint serves at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 32;
/// How long one connection may live: one request, no keep-alive.
const CONNECTION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
///
/// Rule: idle or slow clients cannot exhaust the plugin's file descriptors. At most
/// [`MAX_CONNECTIONS`] connections are open at once (the rest are closed on accept); each
/// serves one request and is closed after [`CONNECTION_DEADLINE`] whatever it is doing.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let response = respond(&metrics, request.uri().path());
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(CONNECTION_DEADLINE / 2)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
            drop(slot);
        });
    }
}

fn respond(metrics: &Metrics, path: &str) -> http::Response<axum::body::Body> {
    let (status, body) = match path {
        "/metrics" => (http::StatusCode::OK, metrics.render()),
        "/healthz" => (http::StatusCode::OK, "ok\n".to_owned()),
        _ => (http::StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = http::Response::new(axum::body::Body::from(body));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric family the plugin exports is documented in the README's table, with its
    /// labels.
    #[test]
    fn the_readme_documents_every_metric_and_label() {
        let metrics = Metrics::new();
        metrics.record("CreateVolume", "Ok", Instant::now());
        metrics.fill_progress("bucket/name:v1", &Default::default());
        metrics.access_decision("denied");
        let readme = include_str!("../README.md");
        let families = metrics.registry.gather();
        assert_eq!(families.len(), 5, "a new metric: document it in the README");
        for family in families {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", family.name())))
                .unwrap_or_else(|| {
                    panic!("{} is not in the README's metrics table", family.name())
                });
            for label in family.get_metric()[0].get_label() {
                assert!(
                    row.contains(&format!("`{}`", label.name())),
                    "{}: label {} undocumented",
                    family.name(),
                    label.name()
                );
            }
        }
    }
}
