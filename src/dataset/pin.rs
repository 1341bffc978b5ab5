//! Pinned datasets: a reference resolved to one immutable thing — a committed version of a
//! stored dataset, or one Git commit. A pin is what a volume records, so the data under it
//! never changes after it was resolved.

use super::gitpolicy::{Admitted, GitPolicy};
use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::bucket::{Bucket, Buckets, Location, Mode};
use super::reference::{Reference, Selector};
use super::repo::{Error, Repo, Result};
use super::scan::hex;
use super::store::BucketStore;
use super::store::fs::FsStore;
use super::store::s3::{S3Settings, S3Store};

/// One immutable dataset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Pin {
    Stored {
        bucket: String,
        name: String,
        version: String,
    },
    Git {
        url: String,
        commit: String,
    },
}

impl Pin {
    /// A directory name for this pin: readable, and unique through a hash of the whole pin.
    pub fn key(&self) -> String {
        let digest = hex(&Sha256::digest(self.to_string().as_bytes()));
        match self {
            Pin::Stored { name, version, .. } => format!("{name}-{version}-{}", &digest[..16]),
            Pin::Git { commit, .. } => format!("git-{}-{}", &commit[..12], &digest[..16]),
        }
    }

    /// Parses a pinned reference as [`fmt::Display`] writes it (what a volume context holds).
    pub fn parse(text: &str) -> Result<Pin> {
        match Reference::parse(text).map_err(|e| Error::Invalid(e.to_string()))? {
            Reference::Stored {
                bucket: Some(bucket),
                name,
                selector: Selector::Named(version),
            } if version.starts_with('v') => Ok(Pin::Stored {
                bucket,
                name,
                version,
            }),
            Reference::Git { url, git_ref }
                if git_ref.len() == 40 && git_ref.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                Ok(Pin::Git {
                    url,
                    commit: git_ref,
                })
            }
            _ => Err(Error::Invalid(format!(
                "{text:?} is not a pinned dataset (bucket/name:v<N> or git+URL@<commit SHA>)"
            ))),
        }
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pin::Stored {
                bucket,
                name,
                version,
            } => write!(f, "{bucket}/{name}:{version}"),
            Pin::Git { url, commit } => write!(f, "git+{url}@{commit}"),
        }
    }
}

/// The configured buckets, with one open repository per bucket (clients are reused).
pub struct Sources {
    buckets: Buckets,
    jobs: usize,
    open: Mutex<HashMap<String, Repo<BucketStore>>>,
    /// The Kubernetes API for buckets whose credentials are in a Secret (default: found
    /// in-cluster or from a kubeconfig when first needed).
    kube: std::sync::Arc<crate::kubeapi::Kube>,
    /// Which Git sources volumes may use.
    git_policy: GitPolicy,
    /// Bodies in memory at once, across every repository opened here.
    budget: super::budget::Budget,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("buckets", &self.buckets)
            .finish_non_exhaustive()
    }
}

impl Sources {
    pub fn new(buckets: Buckets, jobs: usize) -> Sources {
        Sources {
            buckets,
            jobs,
            open: Mutex::default(),
            kube: Default::default(),
            git_policy: GitPolicy::default(),
            budget: Default::default(),
        }
    }

    /// Holds the bodies of every transfer within `budget` (`cache.max_memory`).
    pub fn with_budget(mut self, budget: super::budget::Budget) -> Sources {
        self.budget = budget;
        self
    }

    /// Uses `policy` for the Git sources of volumes (default: public `https` only).
    pub fn with_git_policy(mut self, policy: GitPolicy) -> Sources {
        self.git_policy = policy;
        self
    }

    /// Uses `client` to read credential Secrets.
    pub fn with_kube(mut self, client: kube::Client) -> Sources {
        self.kube = std::sync::Arc::new(crate::kubeapi::Kube::with(client));
        self
    }

    /// Shares `kube`, the process's one Kubernetes client factory.
    pub fn with_kube_factory(mut self, kube: std::sync::Arc<crate::kubeapi::Kube>) -> Sources {
        self.kube = kube;
        self
    }

    /// The repository of a bucket (`None`: the default bucket) and the bucket's name.
    pub async fn repo(&self, bucket: Option<&str>) -> Result<Repo<BucketStore>> {
        let bucket = self.buckets.get(bucket).map_err(Error::NotFound)?;
        if let Some(repo) = self.lock().get(&bucket.name) {
            return Ok(repo.clone());
        }
        let repo = open(bucket, self.jobs, &self.kube)
            .await?
            .with_budget(self.budget.clone());
        self.lock().insert(bucket.name.clone(), repo.clone());
        Ok(repo)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Repo<BucketStore>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pin a reference names by itself, asking no bucket: a stored dataset at an explicit
    /// version (`v<N>`) in a configured bucket. Only a caller that knows the version is
    /// committed (a finished cache tree is only ever built from one) may use it.
    pub fn explicit_pin(&self, reference: &str) -> Option<Pin> {
        match Reference::parse(reference).ok()? {
            Reference::Stored {
                bucket,
                name,
                selector: Selector::Named(version),
            } if super::repo::version_number(&version).is_some() => {
                let bucket = self.buckets.get(bucket.as_deref()).ok()?.name.clone();
                Some(Pin::Stored {
                    bucket,
                    name,
                    version,
                })
            }
            _ => None,
        }
    }

    /// [`Sources::pin`] for a volume (a PVC or an inline volume): Git sources must pass the
    /// admin's allow-list first, since whoever writes a pod spec chooses the URL.
    pub async fn pin_for_volume(&self, reference: &str) -> Result<Pin> {
        self.pin_under(reference, Some(&self.git_policy)).await
    }

    /// Checks a Git URL against the volume policy; what git must be told to fetch it the way
    /// it was checked. Blocking (DNS) work runs off the runtime.
    pub async fn admit_git(&self, url: &str) -> Result<Admitted> {
        let (policy, url) = (self.git_policy.clone(), url.to_owned());
        tokio::task::spawn_blocking(move || policy.check(&url))
            .await
            .map_err(|e| Error::Invalid(format!("git policy task: {e}")))?
            .map_err(Error::from)
    }

    /// Resolves a reference (`latest`, a tag, a branch) to the one version it names now, with
    /// any Git source allowed (for people's own use, not volumes).
    pub async fn pin(&self, reference: &str) -> Result<Pin> {
        self.pin_under(reference, None).await
    }

    async fn pin_under(&self, reference: &str, policy: Option<&GitPolicy>) -> Result<Pin> {
        match Reference::parse(reference).map_err(|e| Error::Invalid(e.to_string()))? {
            Reference::Stored {
                bucket,
                name,
                selector,
            } => {
                let bucket = self
                    .buckets
                    .get(bucket.as_deref())
                    .map_err(Error::NotFound)?
                    .name
                    .clone();
                let manifest = self
                    .repo(Some(&bucket))
                    .await?
                    .resolve_head(&name, &selector)
                    .await?;
                if !manifest.committed {
                    return Err(Error::Immutable(format!(
                        "{bucket}/{name}:{} is not committed; only committed versions can be \
                         mounted (run `lanes dataset commit`)",
                        manifest.version
                    )));
                }
                Ok(Pin::Stored {
                    bucket,
                    name,
                    version: manifest.version,
                })
            }
            Reference::Git { url, git_ref } => {
                let admitted = match policy {
                    Some(_) => self.admit_git(&url).await?,
                    None => Admitted::default(),
                };
                let commit = tokio::task::spawn_blocking(move || {
                    super::git::resolve(&url, &git_ref, &admitted).map(|c| (url, c))
                })
                .await
                .map_err(|e| Error::Invalid(format!("git resolve task: {e}")))??;
                Ok(Pin::Git {
                    url: commit.0,
                    commit: commit.1,
                })
            }
        }
    }
}

/// The repository of a configured bucket. S3 credentials come from the Secret the bucket
/// names (read through `kube`, or the default Kubernetes client), else from the standard AWS
/// chain (environment, profile, workload identity).
pub async fn open(
    bucket: &Bucket,
    jobs: usize,
    kube: &crate::kubeapi::Kube,
) -> Result<Repo<BucketStore>> {
    let secret = match &bucket.credentials {
        None => None,
        Some(reference) => {
            let client = match kube.client().await {
                Ok(client) => client,
                Err(e) => {
                    return Err(Error::Store(crate::dataset::store::Error::Remote {
                        what: "credentials",
                        key: reference.secret_name.clone(),
                        message: format!(
                            "bucket {} takes its credentials from a Kubernetes Secret: {e}",
                            bucket.name
                        ),
                        unavailable: true,
                    }));
                }
            };
            let namespace = reference
                .namespace
                .clone()
                .unwrap_or_else(super::secret::own_namespace);
            Some(super::secret::SecretCredentials::new(
                client,
                &namespace,
                &reference.secret_name,
            ))
        }
    };
    let store = match &bucket.location {
        Location::File(dir) => BucketStore::Fs(FsStore::new(dir)),
        Location::S3 {
            bucket: name,
            prefix,
        } => {
            let settings = S3Settings {
                region: bucket.region.clone(),
                endpoint: bucket.endpoint.clone(),
                credentials: None,
                secret,
                multipart: Default::default(),
            };
            BucketStore::S3(S3Store::connect(name, prefix, &settings).await)
        }
    };
    Ok(Repo::new(
        store,
        &bucket.name,
        bucket.mode == Mode::ReadWrite,
        jobs,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip_and_only_pinned_references_parse() {
        let stored = Pin::Stored {
            bucket: "prod".into(),
            name: "imagenet".into(),
            version: "v3".into(),
        };
        assert_eq!(Pin::parse(&stored.to_string()).unwrap(), stored);
        let git = Pin::Git {
            url: "https://example.com/r.git".into(),
            commit: "a".repeat(40),
        };
        assert_eq!(Pin::parse(&git.to_string()).unwrap(), git);
        for loose in [
            "imagenet:v3",
            "prod/imagenet",
            "prod/imagenet:best",
            "git+https://x/r@main",
        ] {
            assert!(Pin::parse(loose).is_err(), "{loose}");
        }
        assert_ne!(stored.key(), git.key());
        assert!(stored.key().starts_with("imagenet-v3-"));
    }
}
