//! Test hooks that make the process die as if by `kill -9` at a named point, to prove that a
//! retry after a crash ends in the right state. Set with `LANES_FAILPOINT`; unset in
//! production, where none of this does anything.

use std::sync::OnceLock;
use std::time::Duration;

/// The configured failpoint, if any: `LANES_FAILPOINT`, read once per process.
pub fn configured() -> Option<String> {
    static CONFIGURED: OnceLock<Option<String>> = OnceLock::new();
    CONFIGURED
        .get_or_init(|| {
            std::env::var("LANES_FAILPOINT")
                .ok()
                .filter(|v| !v.is_empty())
        })
        .clone()
}

/// N for a failpoint configured as `<name>:N` (die at the N-th occurrence).
pub fn count(name: &str) -> Option<u64> {
    configured()?
        .strip_prefix(name)?
        .strip_prefix(':')?
        .parse()
        .ok()
}

/// The failpoint a serving process was started with, held by the parts that hit it.
#[derive(Debug, Clone, Default)]
pub struct Failpoint(Option<String>);

impl Failpoint {
    /// Reads `LANES_FAILPOINT`.
    pub fn from_env() -> Failpoint {
        Failpoint(configured())
    }

    /// Kills the process with SIGKILL when `name` is the configured failpoint.
    pub fn hit(&self, name: &str) {
        if self.0.as_deref() == Some(name) {
            kill(name);
        }
    }

    /// Holds the call for two seconds when the failpoint is `delay:<name>` (to make
    /// concurrent calls overlap in tests).
    pub async fn delay(&self, name: &str) {
        if self.0.as_deref().and_then(|v| v.strip_prefix("delay:")) == Some(name) {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// Kills this process with SIGKILL at failpoint `name`.
pub fn kill(name: &str) {
    tracing::error!(failpoint = name, "failpoint reached: killing the process");
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::SIGKILL);
}
