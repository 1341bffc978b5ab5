//! The `lanes` binary: parse arguments, set up logging, hand over to the library.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// glibc malloc arenas for the process, unless `MALLOC_ARENA_MAX` says otherwise. glibc's
/// default (8 per core) lets every thread of the blocking pool keep freed memory in an arena
/// of its own: a pull of 120,000 files held 107 MiB resident for 34 MiB of live heap, 73 MiB
/// with 4 arenas; a cold fill of the same tree 131 MiB, then 93 (README, "Memory").
const MALLOC_ARENAS: i32 = 4;

fn main() -> std::process::ExitCode {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator settings; called before any thread starts.
        unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, MALLOC_ARENAS) };
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("lanes: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
    let cli = lanes::cli::Cli::parse_args();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            // The NFS client's chatter (every connection at INFO) and the AWS credential
            // chain's per-provider warnings stay out: Lanes reports each such failure itself,
            // naming the server or saying which settings to give.
            EnvFilter::try_from_env("LANES_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,nfs_rs=error,aws_config=error")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        lanes::cli::LogFormat::Json => logs.json().init(),
        // Colour codes only on a terminal: log files and `kubectl logs` get plain text.
        lanes::cli::LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    match lanes::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lanes: {}", lanes::text::chain(e.chain()));
            std::process::ExitCode::FAILURE
        }
    }
}
