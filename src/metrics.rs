//! Prometheus metrics and the `/metrics` + `/healthz` HTTP endpoint.
//!
//! Per RPC: a count by result code and a latency histogram. The registry is owned by the
//! [`Metrics`] value handed to the services; there is no global registry.

use std::net::SocketAddr;
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
        }
    }

    /// Records one finished call.
    pub fn record(&self, rpc: &str, code: tonic::Code, started: Instant) {
        self.calls
            .with_label_values(&[rpc, &format!("{code:?}")])
            .inc();
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

/// Serves `/metrics` and `/healthz` on `address` until `shutdown` resolves.
pub async fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "metrics endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
