//! The `lanes` binary: parse arguments, set up logging, hand over to the library.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
