//! Prometheus metrics and the `/metrics` + `/healthz` HTTP endpoint.
//!
//! Per RPC: a count by result code and a latency histogram. The registry is owned by the
//! [`Metrics`] value handed to the services; there is no global registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Counters and histograms of the CSI services.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    calls: IntCounterVec,
    seconds: HistogramVec,
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
