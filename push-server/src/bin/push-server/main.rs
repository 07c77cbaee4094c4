//! `push-server`: run the server ([`serve`]), administer it through its API ([`admin`]), check a
//! site (`doctor`), and act as a device to try it out ([`device`]).

mod admin;
mod device;
mod output;
mod serve;

use clap::{Parser, Subcommand};
use push_server::config::{ConfigArgs, ServeArgs};

#[derive(Parser)]
#[command(
    name = "push-server",
    version,
    about = "Local push server for iOS push provider extensions"
)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "PUSH_LOG_FORMAT", global = true, default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (creates the data directory, CA and admin key on first start).
    Serve(ServeArgs),
    #[command(flatten)]
    Admin(admin::Command),
    /// Site pre-flight: check what breaks sites (certificate names, DNS, reachability, SSIDs,
    /// phone clocks, the data directory) and print the Wi-Fi pitfalls to check on the access
    /// points; one line per finding, exit status 1 on any failure.
    Doctor(ConfigArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    apns_bridge::daemon::init_tracing(cli.log_format == "json");
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args).await,
        Command::Admin(command) => admin::run(command).await,
        Command::Doctor(args) => push_server::doctor::run(args).await.map_err(Into::into),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The outcome is printed already; the status says it.
        Err(e) if e.is::<admin::Unanswered>() => std::process::ExitCode::from(admin::UNANSWERED_EXIT),
        Err(e) if e.is::<push_server::doctor::Failed>() => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
