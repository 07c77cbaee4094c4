//! `push-server serve`: the daemon.

use apns_bridge::daemon::shutdown_signal;
use push_server::{
    config::ServeArgs,
    data_dir::TLS_DIR,
    pki::PkiStatus,
    server::{Ready, Server},
};

/// Run the server until SIGTERM or SIGINT, saying on stdout what start-up did and, last, that it
/// is [`Ready`].
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.load()?;
    // Before "ready": a supervisor may send SIGTERM the moment it sees that line.
    let signal = shutdown_signal()?;
    let server = Server::start(cfg.clone()).await?;
    let tls = cfg.data_dir.join(TLS_DIR);
    println!("data directory: {}", cfg.data_dir.display());
    match server.pki_status {
        PkiStatus::CreatedCa => println!("created a private CA: {}", tls.join("ca.pem").display()),
        PkiStatus::ReissuedServerCert => println!(
            "reissued the server certificate: {}",
            tls.join("server.pem").display()
        ),
        PkiStatus::Loaded => {}
    }
    println!(
        "CA pin (pin this in the provider configuration): {}",
        server.pki.ca_pin
    );
    println!("server certificate names: {}", server.pki.server_names.join(", "));
    if let Some(path) = &server.created_admin_key {
        println!(
            "admin API key written to {} (owner-only; use it with --api-key or PUSH_API_KEY)",
            path.display()
        );
    }
    let ready = Ready {
        devices: server.device_addr,
        api: server.api_addr,
        dashboard: server.http_addr,
    };
    println!("{ready}");
    server.run_until(signal).await;
    Ok(())
}
