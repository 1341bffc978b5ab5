//! The one way Lanes reaches the Kubernetes API: in-cluster configuration or the kubeconfig,
//! found on first use and shared by everything that needs it (PVC annotations, the Secrets
//! bucket credentials come from). Where there is no API (a workstation, the tests), every user
//! gets the same clear reason.

use tokio::sync::OnceCell;

/// A Kubernetes client made once, when first asked for.
#[derive(Default)]
pub struct Kube {
    client: OnceCell<Result<kube::Client, String>>,
    fail_fast: OnceCell<Result<kube::Client, String>>,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("ready", &self.client.initialized())
            .finish()
    }
}

impl Kube {
    /// A factory that hands out `client` (tests point it at their own API server).
    pub fn with(client: kube::Client) -> Kube {
        Kube {
            client: OnceCell::new_with(Some(Ok(client.clone()))),
            fail_fast: OnceCell::new_with(Some(Ok(client))),
        }
    }

    /// A factory that has no API, for `reason`.
    pub fn none(reason: &str) -> Kube {
        Kube {
            client: OnceCell::new_with(Some(Err(reason.to_owned()))),
            fail_fast: OnceCell::new_with(Some(Err(reason.to_owned()))),
        }
    }

    /// The client, or why there is none.
    pub async fn client(&self) -> Result<kube::Client, String> {
        self.client
            .get_or_init(|| async {
                kube::Client::try_default().await.map_err(|e| {
                    format!("no Kubernetes API reachable (in-cluster or kubeconfig): {e}")
                })
            })
            .await
            .clone()
    }

    /// A client that does not retry an answer of 429/503/504 itself: for callers that must
    /// see at once that the API is unavailable (the node's permission decisions fail closed
    /// and retry on their own terms) rather than wait through minutes of back-off.
    pub async fn fail_fast(&self) -> Result<kube::Client, String> {
        self.fail_fast
            .get_or_init(|| async {
                let mut config = kube::Config::infer().await.map_err(|e| {
                    format!("no Kubernetes API reachable (in-cluster or kubeconfig): {e}")
                })?;
                config.default_retry = false;
                kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
            })
            .await
            .clone()
    }
}
