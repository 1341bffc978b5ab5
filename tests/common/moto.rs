//! A real S3 server (moto) on loopback for the tests that need one.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lanes::dataset::store::s3::{S3Settings, S3Store};

/// A moto S3 server on a free loopback port; stopped on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    /// Starts moto_server from the project's virtualenv (scripts/test.sh installs it) or
    /// `LANES_MOTO_SERVER`. `None` (after saying so) when it is not installed outside CI.
    pub fn start() -> Option<Moto> {
        let binary = std::env::var_os("LANES_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server"));
        if !binary.exists() {
            if std::env::var("LANES_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!(
                    "moto_server not found at {}; scripts/test.sh installs it",
                    binary.display()
                );
            }
            eprintln!("SKIPPED S3 store tests: moto_server not installed (run scripts/test.sh)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        })
    }

    pub fn settings(&self) -> S3Settings {
        S3Settings {
            region: Some("us-east-1".into()),
            endpoint: Some(self.endpoint.clone()),
            credentials: Some(("testing".into(), "testing".into())),
            secret: None,
            multipart: Default::default(),
        }
    }

    /// A plain SDK client on this server, to look behind a store's back.
    pub fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::config::Builder::new()
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Creates a bucket and returns a store on it under `prefix`.
    pub async fn store(&self, bucket: &str, prefix: &str) -> S3Store {
        self.client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        S3Store::connect(bucket, prefix, &self.settings()).await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes every ambient AWS setting from `command` and gives it moto's test credentials.
pub fn aws_env(command: &mut Command) {
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") {
            command.env_remove(key);
        }
    }
    command
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
}
