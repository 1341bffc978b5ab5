//! S3 credentials from a Kubernetes Secret (a bucket's `credentials: {secretName: …}`).
//!
//! The Secret is read through the Kubernetes API when the S3 client first needs credentials
//! and again after they expire (five minutes), so a rotated Secret is picked up without a
//! restart. Rules: the values never reach a log, an error or a `Debug` print; an error names
//! the Secret and the keys it lacks, never what it holds.

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::future::ProvideCredentials as CredentialsFuture;
use aws_sdk_s3::config::{Credentials, ProvideCredentials};
use k8s_openapi::api::core::v1::Secret;

/// Keys accepted for the access key ID and the secret key, in order of preference.
const ID_KEYS: &[&str] = &["access_key_id", "AWS_ACCESS_KEY_ID", "accessKeyID"];
const SECRET_KEYS: &[&str] = &["access_key", "AWS_SECRET_ACCESS_KEY", "secretAccessKey"];
const TOKEN_KEYS: &[&str] = &["session_token", "AWS_SESSION_TOKEN"];
/// How long credentials read from a Secret are used before it is read again.
const REFRESH: Duration = Duration::from_secs(300);

/// Reads credentials from Secret `name` in `namespace`.
#[derive(Clone)]
pub struct SecretCredentials {
    client: kube::Client,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for SecretCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretCredentials({}/{})", self.namespace, self.name)
    }
}

impl SecretCredentials {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> SecretCredentials {
        SecretCredentials {
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Fetches the Secret and picks out the credentials.
    pub async fn load(&self) -> Result<Credentials, String> {
        let shown = format!("Secret {}/{}", self.namespace, self.name);
        let api: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), &self.namespace);
        let secret = match api.get_opt(&self.name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => return Err(format!("{shown} does not exist")),
            Err(kube::Error::Api(status)) if status.code == 403 => {
                return Err(format!(
                    "{shown} cannot be read: the plugin's service account needs `get` on \
                     secrets in {}",
                    self.namespace
                ));
            }
            Err(e) => return Err(format!("{shown} could not be read: {e}")),
        };
        let data = secret.data.unwrap_or_default();
        let pick = |keys: &[&str]| {
            keys.iter().find_map(|k| {
                data.get(*k)
                    .map(|v| String::from_utf8_lossy(&v.0).trim().to_owned())
                    .filter(|v| !v.is_empty())
            })
        };
        let (Some(id), Some(key)) = (pick(ID_KEYS), pick(SECRET_KEYS)) else {
            return Err(format!(
                "{shown} needs an access key ID (one of {}) and a secret key (one of {})",
                ID_KEYS.join(", "),
                SECRET_KEYS.join(", ")
            ));
        };
        Ok(Credentials::new(
            id,
            key,
            pick(TOKEN_KEYS),
            Some(SystemTime::now() + REFRESH),
            "lanes-kubernetes-secret",
        ))
    }
}

impl ProvideCredentials for SecretCredentials {
    fn provide_credentials<'a>(&'a self) -> CredentialsFuture<'a>
    where
        Self: 'a,
    {
        CredentialsFuture::new(async move {
            self.load().await.map_err(CredentialsError::provider_error)
        })
    }
}

/// The namespace the plugin runs in: `POD_NAMESPACE`, else the service account's namespace,
/// else `default`.
pub fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|n| n.trim().to_owned())
        })
        .unwrap_or_else(|| "default".into())
}
