//! The commands that talk to a running server's API (and `restore`, which replaces a stopped
//! one's data directory).

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use push_proto::{
    device::{CancelReason, Priority},
    sender::{
        ApiKeyState, BackupRequest, CallState, CancelCallRequest, CreateApiKeyRequest, DeviceList,
        EnrollDeviceRequest, EscalationStep, GetMessageStatusRequest, IssueDeviceCredentialRequest,
        ListApiKeysRequest, ListDevicesRequest, PlaceCallRequest, RevokeApiKeyRequest, RevokeDeviceRequest,
        RotateCaRequest, SendMessageRequest, SetVoipTokenRequest, Target, VoipTokenState, WatchCallRequest,
        target,
    },
};
use push_server::{
    api_client::{AdminClient, ApiClient, SenderClient},
    data_dir::{ADMIN_KEY_FILE, TLS_DIR},
};

use crate::{
    device::{self, ConnectArgs},
    output::{
        call_state_name, clock, device_json, key_json, print_json, state_name, status_lines, update_json,
        update_line, when,
    },
};

/// The commands besides `serve` and `doctor`, in the order `--help` lists them.
#[derive(Subcommand)]
pub enum Command {
    /// Manage and try out devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Send a message.
    Send(SendArgs),
    /// Show the delivery status of a message.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Message id.
        message_id: String,
        /// Print JSON (times as Unix ms) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ring devices (with --wait: follow the call to its outcome; exit status 0 when answered,
    /// 3 when it ended otherwise: declined, missed or cancelled).
    Call(CallArgs),
    /// Stop ringing a call.
    CancelCall {
        #[command(flatten)]
        api: ApiArgs,
        /// Call id.
        call_id: String,
    },
    /// Manage sender API keys: create, list, revoke (`api-key` is the old name).
    #[command(subcommand, visible_alias = "api-key")]
    Key(ApiKeyCommand),
    /// Take a backup of a running server (store snapshot, CA and keys) into a new file, owner-only.
    Backup(BackupArgs),
    /// The device-facing CA.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Check a backup and install it as a stopped server's data directory (the old one is
    /// moved aside); the restored store gets a new epoch.
    Restore(RestoreArgs),
}

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Rotate the CA of a running server: the standby key becomes the CA, the server
    /// certificate is reissued, a new standby key is made; listeners present it at once. Phones
    /// enrolled before the previous rotation must be enrolled again.
    RotateCa {
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args)]
pub struct BackupArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The backup file to create (mode 0600; an existing file is not overwritten).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The backup file.
    #[arg(long = "from")]
    from: PathBuf,
    /// The data directory to install it as (its server must be stopped).
    #[arg(long, env = "PUSH_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
}

#[derive(Args, Clone)]
pub struct ApiArgs {
    /// API address.
    #[arg(long, env = "PUSH_API", default_value = "127.0.0.1:7444")]
    api: SocketAddr,
    /// API key; defaults to the admin key in the data directory.
    #[arg(long, env = "PUSH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Data directory holding tls/ca.pem and admin.key.
    #[arg(long, env = "PUSH_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Name to verify in the server certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

/// A device to register, and where its secret goes.
#[derive(Args)]
pub struct Registration {
    /// Device id.
    device_id: String,
    /// Group (repeatable), e.g. ward:4B.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Validity in days (default 365).
    #[arg(long, default_value_t = 0)]
    valid_days: u32,
    /// Write the result to this file (mode 0600: it holds the credential) instead of printing it.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Register a device and print a new credential for it.
    Issue {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        device: Registration,
    },
    /// Enroll a device: print the property list its container app saves (credential, host and
    /// port, CA and pins, the site's SSIDs in push managers of at most 10).
    Enroll {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        device: Registration,
    },
    /// Revoke every credential of a device and close its session.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// Device id.
        device_id: String,
    },
    /// Register a device's PushKit token for the APNs VoIP fallback (devices normally send it
    /// themselves over their session).
    VoipToken {
        #[command(flatten)]
        api: ApiArgs,
        /// Device id.
        device_id: String,
        /// Hex PushKit token; omit with --clear.
        #[arg(required_unless_present = "clear")]
        token: Option<String>,
        /// Remove the registration.
        #[arg(long, conflicts_with = "token")]
        clear: bool,
    },
    /// List devices with their presence.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this group.
        #[arg(long, default_value = "")]
        group: String,
        /// Only online devices.
        #[arg(long)]
        online: bool,
        /// Print JSON (times as Unix ms) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Act as a device: connect, print every push and acknowledge it.
    Connect(ConnectArgs),
}

#[derive(Args)]
pub struct Recipients {
    /// Device id (repeatable).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Group.
    #[arg(long)]
    group: Option<String>,
}

impl Recipients {
    fn target(&self) -> anyhow::Result<Target> {
        let kind = match (&self.group, self.devices.as_slice()) {
            (Some(g), []) => target::Kind::Group(g.clone()),
            (None, [one]) => target::Kind::DeviceId(one.clone()),
            (None, []) => bail!("give --device or --group"),
            (None, many) => target::Kind::Devices(DeviceList {
                device_ids: many.to_vec(),
            }),
            (Some(_), _) => bail!("give --device or --group, not both"),
        };
        Ok(Target { kind: Some(kind) })
    }
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    to: Recipients,
    /// Title.
    #[arg(long, default_value = "")]
    title: String,
    /// Body.
    #[arg(long)]
    body: String,
    /// TTL in seconds (0: server default).
    #[arg(long, default_value_t = 0)]
    ttl: u32,
    /// Collapse key.
    #[arg(long, default_value = "")]
    collapse_key: String,
    /// Mark as time-sensitive.
    #[arg(long)]
    high: bool,
    /// Wait until every recipient reaches a final state and print each change.
    #[arg(long)]
    wait: bool,
}

#[derive(Args)]
pub struct CallArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    to: Recipients,
    /// Call id (default: random).
    #[arg(long)]
    call_id: Option<String>,
    /// Caller display name.
    #[arg(long)]
    caller_name: String,
    /// Caller handle.
    #[arg(long, default_value = "")]
    caller_handle: String,
    /// Video call.
    #[arg(long)]
    video: bool,
    /// Ring seconds (0: server default); with --escalate it covers every step.
    #[arg(long, default_value_t = 0)]
    ring_secs: u32,
    /// An escalation step, rung while nobody has answered (repeatable, in order):
    /// `<after_secs>:<target>[,<target>...][:stop]`, where `after_secs` counts from the previous
    /// step (the call itself for the first), a target is a device id or `group:<name>` (one group,
    /// or any number of devices), and `:stop` stops the earlier steps' phones ringing.
    /// Example: `--escalate 30:charge-nurse --escalate 60:group:ward:4B:stop`.
    #[arg(long = "escalate", value_name = "AFTER_SECS:TARGETS[:stop]", value_parser = parse_escalation)]
    escalate: Vec<EscalationStep>,
    /// Follow the call: print every change live (local time, device, state, step, path), then
    /// its outcome. Exit status 0 when it was answered, 3 when it ended otherwise (declined,
    /// missed or cancelled), 1 on an error.
    #[arg(long)]
    wait: bool,
}

/// Exit status of `call --wait` when the call ended without an answer.
pub const UNANSWERED_EXIT: u8 = 3;

/// `call --wait` saw the call end without an answer (its outcome is already printed).
#[derive(Debug, thiserror::Error)]
#[error("the call ended {}", call_state_name(*.0))]
pub struct Unanswered(CallState);

/// One `--escalate` value: `<after_secs>:<target>[,<target>...][:stop]`.
fn parse_escalation(spec: &str) -> Result<EscalationStep, String> {
    let (after, rest) = spec
        .split_once(':')
        .ok_or("expected <after_secs>:<target>[,<target>...][:stop]")?;
    let after_seconds: u32 = after
        .parse()
        .map_err(|_| format!("{after:?} is not a number of seconds"))?;
    if after_seconds == 0 {
        return Err("a step starts at least 1 second after the previous one".into());
    }
    // `:stop` is a suffix, so group names with colons (`group:ward:4B`) stay whole.
    let (targets, stop_earlier) = match rest.strip_suffix(":stop") {
        Some(targets) => (targets, true),
        None => (rest, false),
    };
    let mut devices = Vec::new();
    let mut groups = Vec::new();
    for t in targets.split(',') {
        match t.strip_prefix("group:") {
            Some("") => return Err("`group:` needs a group name".into()),
            Some(g) => groups.push(g.to_string()),
            None if t.is_empty() => return Err(format!("empty target in {targets:?}")),
            None => devices.push(t.to_string()),
        }
    }
    let kind = match (groups.as_slice(), devices.as_slice()) {
        ([g], []) => target::Kind::Group(g.clone()),
        ([], [d]) => target::Kind::DeviceId(d.clone()),
        ([], _) => target::Kind::Devices(DeviceList { device_ids: devices }),
        _ => return Err("a step rings one group or a list of devices, not both or several groups".into()),
    };
    Ok(EscalationStep {
        target: Some(Target { kind: Some(kind) }),
        after_seconds,
        stop_earlier,
    })
}

#[derive(Subcommand)]
pub enum ApiKeyCommand {
    /// Create a sender API key and print it on stdout (shown once; its id goes to stderr).
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// Name of the key's holder.
        #[arg(long)]
        name: String,
        /// Scope (repeatable): send, call, read, enroll, admin.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime in days (0: never expires).
        #[arg(long, default_value_t = 0)]
        valid_days: u32,
        /// For an enroll key (repeatable): a group the devices it enrolls join. The phone can
        /// choose among these only.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// List every key (id, name, scopes, groups, expiry, state); never the key itself.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON (times as Unix ms) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id (from `key list`): refused from now on, its streams and dashboard
    /// sessions end.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// Key id (12 hex digits).
        key_id: String,
    },
}

/// Print a device's secret, or write it to `out` (mode 0600) and say where.
fn hand_out(out: Option<PathBuf>, what: &str, device_id: &str, secret: &str) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            push_server::auth::write_secret(&path, secret)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("{what} for {device_id} written to {}", path.display());
        }
        None => println!("{}", secret.trim_end()),
    }
    Ok(())
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Device(DeviceCommand::Issue { api, device }) => {
            let r = admin(&api)
                .await?
                .issue_device_credential(IssueDeviceCredentialRequest {
                    device_id: device.device_id,
                    groups: device.groups,
                    valid_days: device.valid_days,
                })
                .await?
                .into_inner();
            hand_out(device.out, "credential", &r.device_id, &r.credential)
        }
        Command::Device(DeviceCommand::Enroll { api, device }) => {
            let r = admin(&api)
                .await?
                .enroll_device(EnrollDeviceRequest {
                    device_id: device.device_id,
                    groups: device.groups,
                    valid_days: device.valid_days,
                })
                .await?
                .into_inner();
            for warning in &r.warnings {
                eprintln!("warning: {warning}");
            }
            hand_out(device.out, "enrollment", &r.device_id, &r.plist)
        }
        Command::Device(DeviceCommand::Revoke { api, device_id }) => {
            let r = admin(&api)
                .await?
                .revoke_device(RevokeDeviceRequest {
                    device_id: device_id.clone(),
                })
                .await?;
            println!(
                "{device_id} revoked (live session closed: {})",
                r.into_inner().session_closed
            );
            Ok(())
        }
        Command::Device(DeviceCommand::VoipToken {
            api,
            device_id,
            token,
            clear,
        }) => {
            // clap refuses a token with --clear.
            let token = token.unwrap_or_default();
            admin(&api)
                .await?
                .set_voip_token(SetVoipTokenRequest {
                    device_id: device_id.clone(),
                    token,
                })
                .await?;
            println!(
                "{device_id}: VoIP token {}",
                if clear { "cleared" } else { "registered" }
            );
            Ok(())
        }
        Command::Device(DeviceCommand::List {
            api,
            group,
            online,
            json,
        }) => {
            let r = sender(&api)
                .await?
                .list_devices(ListDevicesRequest {
                    group,
                    online_only: online,
                })
                .await?;
            let devices = r.into_inner().devices;
            if json {
                return print_json(devices.iter().map(device_json).collect());
            }
            println!(
                "{:<24} {:<7} {:<16} {:>9} {:>6} {:<8} {:<12} LAST DROP",
                "DEVICE", "ONLINE", "SSID", "AGE(s)", "QUEUED", "VOIP", "NODE"
            );
            for d in devices {
                let voip = match d.voip_token() {
                    VoipTokenState::None => "-",
                    VoipTokenState::Registered => "token",
                    VoipTokenState::Invalid => "invalid",
                };
                println!(
                    "{:<24} {:<7} {:<16} {:>9} {:>6} {:<8} {:<12} {}",
                    d.device_id,
                    if d.revoked {
                        "revoked"
                    } else if d.online {
                        "yes"
                    } else {
                        "no"
                    },
                    d.ssid,
                    d.session_age_seconds,
                    d.queued,
                    voip,
                    if d.node.is_empty() { "-" } else { &d.node },
                    d.last_disconnect_reason
                );
            }
            Ok(())
        }
        Command::Device(DeviceCommand::Connect(args)) => device::connect(args).await,
        Command::Send(args) => {
            let mut client = sender(&args.api).await?;
            let r = client
                .send_message(SendMessageRequest {
                    target: Some(args.to.target()?),
                    title: args.title,
                    body: args.body,
                    priority: if args.high {
                        Priority::High
                    } else {
                        Priority::Normal
                    } as i32,
                    ttl_seconds: args.ttl,
                    collapse_key: args.collapse_key,
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("message {}", r.message_id);
            for rc in &r.recipients {
                println!("  {:<24} {:?} {}", rc.device_id, rc.state(), rc.reason);
            }
            if args.wait {
                let mut stream = client
                    .watch_message(GetMessageStatusRequest {
                        message_id: r.message_id,
                    })
                    .await?
                    .into_inner();
                while let Some(u) = stream.message().await? {
                    println!("  {:<24} {:?} {}", u.device_id, u.state(), u.reason);
                }
            }
            Ok(())
        }
        Command::Status {
            api,
            message_id,
            json,
        } => {
            let r = sender(&api)
                .await?
                .get_message_status(GetMessageStatusRequest { message_id })
                .await?
                .into_inner();
            if json {
                let recipients = r.recipients.iter().map(update_json).collect();
                return print_json(serde_json::json!({
                    "message_id": r.message_id,
                    "recipients": serde_json::Value::Array(recipients),
                }));
            }
            for u in r.recipients {
                println!(
                    "{:<24} {:<14} {:<20} {}",
                    u.device_id,
                    state_name(u.state()),
                    when(u.at_ms, "-"),
                    u.reason
                );
            }
            Ok(())
        }
        Command::Call(args) => {
            let call_id = args.call_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let mut client = sender(&args.api).await?;
            let r = client
                .place_call(PlaceCallRequest {
                    call_id,
                    target: Some(args.to.target()?),
                    caller_name: args.caller_name,
                    caller_handle: args.caller_handle,
                    video: args.video,
                    ring_timeout_seconds: args.ring_secs,
                    escalation: args.escalate,
                })
                .await?
                .into_inner();
            println!(
                "call {} (uuid {}) rings until {}",
                r.call_id,
                r.call_uuid,
                clock(r.ring_deadline_ms)
            );
            for rc in &r.recipients {
                println!("  {:<24} {:?} {}", rc.device_id, rc.state(), rc.reason);
            }
            if !args.wait {
                return Ok(());
            }
            let req = WatchCallRequest {
                call_id: r.call_id.clone(),
            };
            // WatchCall ends once the call ended and every callee's outcome is known.
            let mut stream = client.watch_call(req.clone()).await?.into_inner();
            while let Some(u) = stream.message().await? {
                println!("{}", update_line(&u));
            }
            let status = client.get_call_status(req).await?.into_inner();
            for line in status_lines(&status) {
                println!("{line}");
            }
            match status.state() {
                CallState::Answered => Ok(()),
                other => Err(Unanswered(other).into()),
            }
        }
        Command::CancelCall { api, call_id } => {
            let reason = CancelReason::CallerCancelled as i32;
            let r = sender(&api)
                .await?
                .cancel_call(CancelCallRequest { call_id, reason })
                .await?
                .into_inner();
            println!("cancelled; {} device(s) sent a cancel", r.cancels_sent);
            Ok(())
        }
        Command::Key(ApiKeyCommand::Create {
            api,
            name,
            scopes,
            valid_days,
            groups,
        }) => {
            let r = admin(&api)
                .await?
                .create_api_key(CreateApiKeyRequest {
                    name,
                    scopes,
                    valid_days,
                    enroll_groups: groups,
                })
                .await?
                .into_inner();
            eprintln!(
                "key {} ({}), expires {}",
                r.key_id,
                r.name,
                when(r.expires_at_ms, "never")
            );
            println!("{}", r.api_key);
            Ok(())
        }
        Command::Key(ApiKeyCommand::List { api, json }) => {
            let keys = admin(&api)
                .await?
                .list_api_keys(ListApiKeysRequest {})
                .await?
                .into_inner()
                .keys;
            if json {
                return print_json(keys.iter().map(key_json).collect());
            }
            println!(
                "{:<12} {:<20} {:<8} {:<20} {:<20} {:<20} GROUPS",
                "ID", "NAME", "STATE", "SCOPES", "CREATED", "EXPIRES"
            );
            for k in keys {
                let state = match k.state() {
                    ApiKeyState::Active => "active",
                    ApiKeyState::Expired => "expired",
                    ApiKeyState::Revoked => "revoked",
                    ApiKeyState::Unspecified => "?",
                };
                println!(
                    "{:<12} {:<20} {:<8} {:<20} {:<20} {:<20} {}",
                    k.key_id,
                    k.name,
                    state,
                    k.scopes.join(","),
                    when(k.created_at_ms, "-"),
                    when(k.expires_at_ms, "never"),
                    k.enroll_groups.join(",")
                );
            }
            Ok(())
        }
        Command::Backup(args) => backup(args).await,
        Command::Pki(PkiCommand::RotateCa { api }) => rotate_ca(&api).await,
        Command::Restore(args) => restore(&args),
        Command::Key(ApiKeyCommand::Revoke { api, key_id }) => {
            let key = admin(&api)
                .await?
                .revoke_api_key(RevokeApiKeyRequest { key_id })
                .await?
                .into_inner()
                .key
                .context("the server answered without the key")?;
            println!(
                "key {} ({}) revoked at {}",
                key.key_id,
                key.name,
                when(key.revoked_at_ms, "-")
            );
            Ok(())
        }
    }
}

async fn rotate_ca(api: &ApiArgs) -> anyhow::Result<()> {
    let r = admin(api)
        .await?
        .rotate_ca(RotateCaRequest {})
        .await?
        .into_inner();
    println!(
        "CA rotated to generation {}: CA pin {}, standby pin {}; new enrollments carry both",
        r.generation, r.ca_pin, r.next_ca_pin
    );
    if let Some(cut_off) = r.generation.checked_sub(1).filter(|g| *g > 0) {
        println!(
            "phones enrolled before generation {cut_off} (the previous rotation) pin neither key: \
             enroll them again"
        );
    }
    Ok(())
}

/// Stream the server's backup into `<out>.partial`, renamed to `out` once the last chunk came.
async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    if args.out.exists() {
        bail!("{} exists; a backup never overwrites a file", args.out.display());
    }
    let mut partial = args.out.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let received = async {
        let mut stream = admin(&args.api)
            .await?
            .backup(BackupRequest {})
            .await?
            .into_inner();
        while let Some(chunk) = stream.message().await? {
            file.write_all(&chunk.data)?;
            if chunk.created_at_ms != 0 {
                file.sync_all()?;
                return Ok(chunk);
            }
        }
        bail!("the server ended the backup before its last chunk")
    }
    .await;
    let last = match received {
        Ok(last) => last,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), args.out.display()))?;
    println!(
        "backup of {} written to {} (owner-only: it holds the site's keys): {}",
        when(last.created_at_ms, "-"),
        args.out.display(),
        last.files.join(", ")
    );
    Ok(())
}

fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let restored = push_server::backup::restore(&args.from, &args.data_dir)?;
    println!(
        "restored the backup of {} (push-server {}) into {}; new store epoch {}: phones renumber \
         above what they have seen, and messages accepted after the backup must be sent again",
        when(restored.manifest.created_at_ms, "-"),
        restored.manifest.server_version,
        args.data_dir.display(),
        restored.epoch
    );
    if let Some(previous) = restored.previous {
        println!("the replaced data directory is now {}", previous.display());
    }
    Ok(())
}

pub fn read_ca(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join(TLS_DIR).join("ca.pem");
    std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the server's CA at {}", path.display()))
}

async fn api(args: &ApiArgs) -> anyhow::Result<ApiClient> {
    let ca = read_ca(&args.data_dir)?;
    let key = match &args.api_key {
        Some(k) => k.clone(),
        None => {
            let path = args.data_dir.join(ADMIN_KEY_FILE);
            std::fs::read_to_string(&path)
                .with_context(|| format!("no --api-key given and cannot read {}", path.display()))?
                .trim()
                .to_string()
        }
    };
    ApiClient::connect(args.api, &args.server_name, &ca, &key).await
}

async fn sender(args: &ApiArgs) -> anyhow::Result<SenderClient> {
    Ok(api(args).await?.sender())
}

async fn admin(args: &ApiArgs) -> anyhow::Result<AdminClient> {
    Ok(api(args).await?.admin())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn kind(step: &EscalationStep) -> target::Kind {
        step.target.clone().unwrap().kind.unwrap()
    }

    #[test]
    fn escalate_reads_devices_groups_and_stop() {
        let s = parse_escalation("30:charge-nurse").unwrap();
        assert_eq!((s.after_seconds, s.stop_earlier), (30, false));
        assert_eq!(kind(&s), target::Kind::DeviceId("charge-nurse".into()));

        let s = parse_escalation("60:a,b:stop").unwrap();
        assert_eq!((s.after_seconds, s.stop_earlier), (60, true));
        let list = DeviceList {
            device_ids: vec!["a".into(), "b".into()],
        };
        assert_eq!(kind(&s), target::Kind::Devices(list));

        // A group name may hold colons; only a trailing `:stop` is the flag.
        let s = parse_escalation("5:group:ward:4B:stop").unwrap();
        assert!(s.stop_earlier);
        assert_eq!(kind(&s), target::Kind::Group("ward:4B".into()));
        let s = parse_escalation("5:group:ward:4B").unwrap();
        assert!(!s.stop_earlier);
        assert_eq!(kind(&s), target::Kind::Group("ward:4B".into()));
    }

    #[test]
    fn escalate_refuses_bad_syntax_with_a_reason() {
        for (bad, says) in [
            ("charge", "expected <after_secs>"),
            ("x:charge", "not a number"),
            ("-1:charge", "not a number"),
            ("0:charge", "at least 1 second"),
            ("10:", "empty target"),
            ("10:a,,b", "empty target"),
            ("10:group:", "needs a group name"),
            ("10:group:a,group:b", "one group or a list"),
            ("10:group:a,phone", "one group or a list"),
        ] {
            let e = parse_escalation(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn escalate_is_a_clap_error_on_the_command_line() {
        let args = ["push-server", "call", "--device", "a", "--caller-name", "x"];
        let ok = crate::Cli::try_parse_from(args.iter().chain(&[
            "--escalate",
            "30:b",
            "--escalate",
            "60:group:ward:4B:stop",
        ]));
        let Ok(crate::Cli {
            command: crate::Command::Admin(Command::Call(call)),
            ..
        }) = ok
        else {
            panic!("parsed: {:?}", ok.err());
        };
        assert_eq!(call.escalate.len(), 2);
        assert!(call.escalate[1].stop_earlier);
        let Err(e) = crate::Cli::try_parse_from(args.iter().chain(&["--escalate", "soon:b"])) else {
            panic!("a bad --escalate was accepted");
        };
        let text = e.to_string();
        assert!(
            text.contains("--escalate") && text.contains("not a number"),
            "{text}"
        );
    }
}
