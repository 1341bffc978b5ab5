//! S3 credentials from a Kubernetes Secret: the Kubernetes API is a mock service (there is no
//! API server here); the S3 server is real (moto on loopback).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::moto::Moto;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lanes::dataset::bucket::{Buckets, RawDatasets};
use lanes::dataset::pin::Sources;
use lanes::dataset::secret::SecretCredentials;

const KEY: &str = "hunter2-very-secret";

/// A Kubernetes API that knows two Secrets in `lanes-system` and records every path asked.
fn kube_api() -> (kube::Client, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let path = request.uri().path().to_owned();
        log.lock().unwrap().push(path.clone());
        async move {
            // k8s-openapi writes Secret data as base64, as the API server does.
            let secret = |pairs: &[(&str, &str)]| {
                let data = pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect();
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some("x".into()),
                        namespace: Some("lanes-system".into()),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                serde_json::to_value(secret).unwrap()
            };
            let (status, body) = match path.as_str() {
                "/api/v1/namespaces/lanes-system/secrets/cold-cred" => (
                    200,
                    secret(&[("access_key_id", "AKIDEXAMPLE"), ("access_key", KEY)]),
                ),
                "/api/v1/namespaces/lanes-system/secrets/half" => {
                    (200, secret(&[("access_key_id", "AKIDEXAMPLE")]))
                }
                _ => (
                    404,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
            };
            let response = http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap();
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    (kube::Client::new(service, "lanes-system"), seen)
}

#[tokio::test]
async fn credentials_come_from_the_secret_and_never_show() {
    let (client, _) = kube_api();
    let credentials = SecretCredentials::new(client.clone(), "lanes-system", "cold-cred")
        .load()
        .await
        .unwrap();
    assert_eq!(credentials.access_key_id(), "AKIDEXAMPLE");
    assert_eq!(credentials.secret_access_key(), KEY);
    assert!(!format!("{credentials:?}").contains(KEY));
    let provider = SecretCredentials::new(client.clone(), "lanes-system", "cold-cred");
    assert!(!format!("{provider:?}").contains(KEY));

    let missing = SecretCredentials::new(client.clone(), "lanes-system", "nope")
        .load()
        .await
        .unwrap_err();
    assert!(
        missing.contains("lanes-system/nope does not exist"),
        "{missing}"
    );
    let half = SecretCredentials::new(client, "lanes-system", "half")
        .load()
        .await
        .unwrap_err();
    assert!(half.contains("secret key (one of access_key"), "{half}");
    assert!(!half.contains("AKIDEXAMPLE"), "{half}");
}

#[tokio::test]
async fn a_bucket_with_secret_credentials_pushes_and_pulls() {
    let Some(moto) = Moto::start() else { return };
    moto.store("secret-bucket", "").await;
    let raw: RawDatasets = serde_yaml_ng::from_str(&format!(
        "default_bucket: cold\nbuckets:\n  cold: {{dataset_path: \"s3://secret-bucket/ds\", region: us-east-1, endpoint: \"{}\", credentials: {{secretName: cold-cred, namespace: lanes-system}}}}\n",
        moto.endpoint
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buckets = Buckets::from_raw(raw, dir.path()).unwrap();
    let (client, seen) = kube_api();
    let sources = Sources::new(buckets, 4).with_kube(client);
    let repo = sources.repo(None).await.unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha").unwrap();
    repo.create("iris", "").await.unwrap();
    repo.push(&src, "iris", "one", None, true).await.unwrap();
    let pin = sources.pin("iris").await.unwrap();
    assert_eq!(pin.to_string(), "cold/iris:v1");
    let out = dir.path().join("out");
    repo.pull("iris", &lanes::dataset::Selector::Latest, &out)
        .await
        .unwrap();
    assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"alpha");
    let asked: BTreeMap<String, usize> =
        seen.lock()
            .unwrap()
            .iter()
            .fold(BTreeMap::new(), |mut m, p| {
                *m.entry(p.clone()).or_default() += 1;
                m
            });
    assert!(
        asked.contains_key("/api/v1/namespaces/lanes-system/secrets/cold-cred"),
        "the S3 client took its credentials from the Secret: {asked:?}"
    );
}
