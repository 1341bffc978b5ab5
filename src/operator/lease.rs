//! Leader election through a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas exactly one acts. The rule: a replica acts only while it holds the Lease; it
//! renews it every third of its duration, and if it cannot renew before the Lease would
//! expire it exits (the Deployment restarts it as a follower) rather than act alongside a
//! new leader.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

/// One contender for the Lease `name`.
#[derive(Clone)]
pub struct Election {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Election {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Election {
        Election {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Takes or renews the Lease if it is free, expired or ours; false when another holds it.
    async fn try_hold(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(seconds)) => {
                renewed.0 + SignedDuration::from_secs(seconds.into()) < Timestamp::now()
            }
            _ => true,
        };
        if !ours && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = ours.then_some(spec.acquire_time).flatten();
        lease.spec = Some(self.spec(transitions, acquired));
        // The resourceVersion read above makes this a compare-and-swap: a rival that wrote
        // in between makes it fail with 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease, then keeps it in the background.
    pub async fn lead(self) {
        loop {
            match self.try_hold().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "lease: cannot read or write")
                }
            }
            tokio::time::sleep(self.duration / 5).await;
        }
        tracing::info!(identity = %self.identity, lease = %self.name, "leading");
        tokio::spawn(async move {
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(self.duration / 3).await;
                match self.try_hold().await {
                    Ok(true) => last = tokio::time::Instant::now(),
                    Ok(false) => {
                        tracing::error!(lease = %self.name, "lease taken by another replica: stopping");
                        std::process::exit(1);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, lease = %self.name, "lease: renewal failed")
                    }
                }
                if last.elapsed() >= self.duration {
                    tracing::error!(lease = %self.name, "lease not renewed in time: stopping");
                    std::process::exit(1);
                }
            }
        });
    }
}
