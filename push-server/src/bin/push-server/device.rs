//! `device connect`: act as a device, to try a server out.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::Args;
use push_proto::device::{CallOutcome, Hello, Push, push};
use push_server::client::{ClientOptions, DeviceClient};

use crate::{
    admin::read_ca,
    output::{clock, local_datetime},
};

#[derive(Args)]
pub struct ConnectArgs {
    /// Device listener address.
    #[arg(long, env = "PUSH_DEVICE_ADDR", default_value = "127.0.0.1:7443")]
    addr: SocketAddr,
    /// Credential, or @FILE to read it from a file.
    #[arg(long, env = "PUSH_DEVICE_CREDENTIAL", hide_env_values = true)]
    credential: String,
    /// Data directory holding tls/ca.pem.
    #[arg(long, env = "PUSH_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Name to verify in the server certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Highest sequence already seen (resume point).
    #[arg(long, default_value_t = 0)]
    last_seen: u64,
    /// Store epoch that numbered `--last-seen` (printed on connect); 0 if unknown, in which
    /// case the server acknowledges nothing on the strength of `--last-seen`.
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// SSID to report.
    #[arg(long, default_value = "")]
    ssid: String,
    /// Exit after this many pushes (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    count: usize,
    /// What the phone's user does with each call that rings it: answer it (the first answer
    /// of a call wins), decline it, or nothing (it rings until cancelled or missed).
    #[arg(long, value_enum, default_value = "ignore")]
    on_call: OnCall,
}

/// What `device connect` does with a call invite.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum OnCall {
    Answer,
    Decline,
    Ignore,
}

pub async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    let credential = match args.credential.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {path}"))?
            .trim()
            .to_string(),
        None => args.credential,
    };
    let ca_pem = read_ca(&args.data_dir)?;
    let hello = Hello {
        credential,
        sdk_version: concat!("push-server-cli/", env!("CARGO_PKG_VERSION")).into(),
        last_seen_seq: args.last_seen,
        ssid: args.ssid,
        instance_id: uuid::Uuid::new_v4().to_string(),
        epoch: args.epoch,
        device_time_ms: push_server::hub::now_ms(),
        previous_stop_reason: String::new(),
    };
    let mut client = DeviceClient::connect(ClientOptions {
        addr: args.addr,
        server_name: args.server_name,
        ca_pem,
        hello,
    })
    .await?;
    println!(
        "connected as {} (session {}, epoch {}), {} queued push(es) to replay",
        client.server_hello.device_id,
        client.server_hello.session_id,
        client.server_hello.epoch,
        client.server_hello.replay_count
    );
    let mut received = 0;
    while args.count == 0 || received < args.count {
        let push = client.next_push().await?;
        println!("{}", describe(&push));
        client.ack(&[push.seq]).await?;
        received += 1;
        let outcome = match args.on_call {
            OnCall::Answer => CallOutcome::Answered,
            OnCall::Decline => CallOutcome::Declined,
            OnCall::Ignore => continue,
        };
        if let Some(push::Body::CallInvite(invite)) = &push.body {
            let reply = client.report_call(&invite.call_id, outcome).await?;
            println!(
                "call {}: {:?} -> {:?} {}",
                reply.call_id,
                outcome,
                reply.result(),
                reply.detail
            );
        }
    }
    client.close().await?;
    Ok(())
}

/// What `device connect` prints for a push, with times for people.
fn describe(p: &Push) -> String {
    let body = match &p.body {
        Some(push::Body::Message(m)) => format!(
            "message title={:?} body={:?} from {:?}, sent {}, expires {}",
            m.title,
            m.body,
            m.sender,
            local_datetime(m.sent_at_ms),
            local_datetime(m.expires_at_ms)
        ),
        Some(push::Body::CallInvite(c)) => format!(
            "call invite {} from {:?} ({}){}, rings until {}",
            c.call_id,
            c.caller_name,
            c.caller_handle,
            if c.video { ", video" } else { "" },
            clock(c.ring_deadline_ms)
        ),
        Some(push::Body::CallCancel(c)) => format!("call cancel {} ({:?})", c.call_id, c.reason()),
        None => "empty".into(),
    };
    format!("push seq={} id={} {body}", p.seq, p.id)
}
