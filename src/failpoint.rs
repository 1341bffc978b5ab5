//! Test hooks that make the process die as if by `kill -9` at a named point, to prove that a
//! retry after a crash ends in the right state. Set with `LANES_FAILPOINT`; unset in
//! production, where none of this does anything.

/// The configured failpoint, if any.
pub fn configured() -> Option<String> {
    std::env::var("LANES_FAILPOINT")
        .ok()
        .filter(|v| !v.is_empty())
}

/// N for a failpoint configured as `<name>:N` (die at the N-th occurrence).
pub fn count(name: &str) -> Option<u64> {
    configured()?
        .strip_prefix(name)?
        .strip_prefix(':')?
        .parse()
        .ok()
}

/// Kills this process with SIGKILL at failpoint `name`.
pub fn kill(name: &str) {
    tracing::error!(failpoint = name, "failpoint reached: killing the process");
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::SIGKILL);
}
